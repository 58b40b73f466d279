#!/usr/bin/env python
"""Start N local processes of a command as one jax.distributed cluster (see jaxaccel.parallel.launcher).

    python scripts/launch_local.py -n 2 --devices-each 4 -- \
        jaxaccel embed ckpt/minilm --mesh model=2,stage=4 --rules dp_tp_pp -t "hello"

Same as `jaxaccel launch`; exits with the first failing process's exit code.
"""

import argparse
import sys

from jaxaccel.parallel.launcher import launch_local


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--processes", type=int, default=2)
    parser.add_argument("--devices-each", type=int, default=None)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("--log-dir", default=None)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    result = launch_local(command, args.processes, host_devices=args.devices_each, port=args.port,
                          timeout_s=args.timeout, log_dir=args.log_dir)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
