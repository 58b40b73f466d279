"""`jaxaccel bench ...`: benchmarks that run each contender in fresh processes and report
ratios against the named baseline. Outside the library's core import graph: nothing in
`jaxaccel` but `jaxaccel.cli.bench` imports it."""
