"""Write a random-weight ResNet as a Hugging Face directory (and its torchvision-named twin).

    python -m jaxaccel_reference.random_resnet /tmp/resnet50              # ResNet-50 shape
    python -m jaxaccel_reference.random_resnet /tmp/r18 --depths 2,2,2,2 --layer-type basic

No pretrained ResNet weights can be downloaded here. transformers initialises the weights
with a fixed seed, and every batch norm gets random running statistics and affine terms, so
a folding bug changes the logits. DEST/hf holds config.json, model.safetensors and
preprocessor_config.json (transformers' ResNet defaults: ConvNext processor, crop 0.875).
"""

from __future__ import annotations

import argparse
import json
import pathlib

PREPROCESSOR = {
    "crop_pct": 0.875, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
    "image_processor_type": "ConvNextImageProcessor", "resample": 3,
    "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 224},
}


def hf_model(depths=(3, 4, 6, 3), hidden_sizes=(256, 512, 1024, 2048), layer_type="bottleneck",
             embedding_size=64, num_labels=1000, seed=0):
    """A `ResNetForImageClassification` in eval mode with non-trivial batch-norm statistics."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.ResNetConfig(
        depths=list(depths), hidden_sizes=list(hidden_sizes), layer_type=layer_type,
        embedding_size=embedding_size, num_labels=num_labels,
        id2label={i: f"class_{i}" for i in range(num_labels)},
        label2id={f"class_{i}": i for i in range(num_labels)})
    model = transformers.ResNetForImageClassification(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                c = module.num_features
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                assert module.running_mean.shape == (c,)
    return model


def write_hf(model, dest: pathlib.Path, image_size: int = 224) -> pathlib.Path:
    """config.json + model.safetensors + preprocessor_config.json under `dest`."""
    model.save_pretrained(dest, safe_serialization=True)
    pre = {**PREPROCESSOR, "size": {"shortest_edge": image_size}}
    (dest / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    return dest


_TORCHVISION_NAMES = (  # Hugging Face name pattern -> torchvision's (torchvision/models/resnet.py)
    (r"^resnet\.embedder\.embedder\.convolution\.", "conv1."),
    (r"^resnet\.embedder\.embedder\.normalization\.", "bn1."),
    (r"^resnet\.encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.0."),
    (r"^resnet\.encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.1."),
    (r"^resnet\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.convolution\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.conv{int(m[3]) + 1}."),
    (r"^resnet\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.normalization\.",
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.bn{int(m[3]) + 1}."),
    (r"^classifier\.1\.", "fc."),
)


def torchvision_name(name: str) -> str:
    import re

    for pattern, replacement in _TORCHVISION_NAMES:
        renamed, count = re.subn(pattern, replacement, name)
        if count:
            return renamed
    raise ValueError(f"no torchvision name for {name!r}")


def write_torchvision(model, dest: pathlib.Path) -> pathlib.Path:
    """The same weights as a torchvision `resnet*` state dict in `dest/model.safetensors`
    (torchvision itself does not import beside the CPU torch wheel used here)."""
    from safetensors.torch import save_file

    dest.mkdir(parents=True, exist_ok=True)
    state = {torchvision_name(k): v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(dest / "model.safetensors"))
    return dest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jaxaccel_reference.random_resnet",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=pathlib.Path)
    parser.add_argument("--depths", default="3,4,6,3")
    parser.add_argument("--hidden-sizes", default="256,512,1024,2048")
    parser.add_argument("--layer-type", choices=("bottleneck", "basic"), default="bottleneck")
    args = parser.parse_args(argv)
    model = hf_model(tuple(map(int, args.depths.split(","))),
                     tuple(map(int, args.hidden_sizes.split(","))), args.layer_type)
    print(write_hf(model, args.dest / "hf"))


if __name__ == "__main__":
    main()
