"""Write a transformer-shaped jaxaccel checkpoint of random weights, for restore benchmarks.

    python scripts/make_synthetic_checkpoint.py /tmp/ref                # 2.68 GB, 2048 wide
    python scripts/make_synthetic_checkpoint.py /tmp/small --width 256 --layers 4 --vocab 4096
    python scripts/make_synthetic_checkpoint.py /tmp/ref --orbax-default /tmp/ref-orbax

Kept for existing docs: the same as `python -m jaxaccel.bench.synthetic ...`, where the code
and its description live.
"""

from jaxaccel.bench.synthetic import main

if __name__ == "__main__":
    main()
