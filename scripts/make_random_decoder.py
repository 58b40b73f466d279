"""Write a random-weight decoder as a Hugging Face directory and as a jaxaccel checkpoint.

    python scripts/make_random_decoder.py /tmp/gpt2-124m                 # GPT-2 124M shape
    python scripts/make_random_decoder.py /tmp/llama --family llama --layers 4
    python scripts/make_random_decoder.py /tmp/gpt2 --without-torch      # DEST/ckpt only

Kept for existing docs: the same as `python -m jaxaccel_reference.random_decoder ...`, where
the code and its description live (it needs the `reference` extra, torch and transformers, except with --without-torch).
"""

from jaxaccel_reference.random_decoder import main

if __name__ == "__main__":
    main()
