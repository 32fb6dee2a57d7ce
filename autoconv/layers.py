"""Built-in model layer lists and the text forms a user names a layer by."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from typing import Any

from autoconv.errors import InvalidSpecError
from autoconv.spec import ConvSpec, as_pair

_LAYER_FIELDS = ("n", "c", "h", "w", "k", "r", "s", "stride", "pad", "pad_bottom", "pad_right", "dilation", "groups",
                 "bias", "residual", "act", "layout")
_TEXT_FIELDS = ("act", "layout")


@dataclass(frozen=True)
class NamedLayer:
    model: str
    name: str
    spec: ConvSpec

    @property
    def label(self) -> str:
        return f"{self.model}/{self.name}"


@lru_cache(maxsize=1)
def _models_json() -> dict[str, list[dict[str, Any]]]:
    text = resources.files("autoconv").joinpath("data/models.json").read_text()
    return {name: rows for name, rows in json.loads(text).items() if not name.startswith("_")}


def model_names() -> tuple[str, ...]:
    return tuple(_models_json())


def model_layers(model: str, batch: int = 1) -> list[NamedLayer]:
    """The conv layers of a built-in model (shapes only) at a batch size."""
    models = _models_json()
    if model not in models:
        raise InvalidSpecError(f"model: {model!r} is not built in; choose one of {', '.join(models)}")
    layers = []
    for row in models[model]:
        spec = ConvSpec(n=batch, c=int(row["c"]), h=int(row["h"]), w=int(row["w"]), k=int(row["k"]),
                        r=int(row["r"]), s=int(row["s"]), stride=as_pair(int(row["stride"]), "stride"),
                        padding=as_pair(int(row["pad"]), "pad"),
                        groups=int(row.get("groups", 1)))
        layers.append(NamedLayer(model, str(row["name"]), spec))
    return layers


def parse_layer(text: str, batch: int | None = None) -> NamedLayer:
    """A layer from "model/name" (e.g. resnet50/res2_3x3) or "n=1,c=64,h=56,w=56,k=64,r=3,s=3,pad=1"
    (pad: top and left, and bottom and right unless pad_bottom / pad_right say otherwise; a fused
    epilogue with residual=1 and act=relu or act=relu6; layout=NCHW16c for a channel-blocked layout)."""
    text = text.strip()
    if "=" not in text:
        model, _, name = text.partition("/")
        if not name:
            raise InvalidSpecError(
                f"layer: {text!r} is neither MODEL/NAME (e.g. resnet50/res2_3x3) nor key=value pairs "
                f"(e.g. n=1,c=64,h=56,w=56,k=64,r=3,s=3,stride=1,pad=1)"
            )
        for layer in model_layers(model, batch or 1):
            if layer.name == name:
                return layer
        names = ", ".join(layer.name for layer in model_layers(model))
        raise InvalidSpecError(f"layer: {model} has no layer {name!r}; it has {names}")
    values: dict[str, int] = {}
    texts: dict[str, str] = {}
    for part in text.split(","):
        key, sep, raw = part.partition("=")
        key = key.strip()
        if not sep or key not in _LAYER_FIELDS:
            raise InvalidSpecError(f"layer: cannot read {part.strip()!r}; keys are {', '.join(_LAYER_FIELDS)}")
        if key in values or key in texts:
            raise InvalidSpecError(f"layer: {key} is given twice in {text!r}")
        if key in _TEXT_FIELDS:
            texts[key] = raw.strip()
            continue
        try:
            values[key] = int(raw.strip(), 10)
        except ValueError:
            raise InvalidSpecError(f"layer: {key} must be an int, got {raw.strip()!r}") from None
    for flag in ("bias", "residual"):
        if values.get(flag, 0) not in (0, 1):
            raise InvalidSpecError(f"layer: {flag} must be 0 or 1, got {values[flag]}")
    if texts.get("act", "relu") not in ("relu", "relu6"):
        raise InvalidSpecError(f"layer: act must be relu or relu6, got {texts['act']!r}")
    missing = [key for key in ("c", "h", "w", "k", "r", "s") if key not in values]
    if missing:
        raise InvalidSpecError(f"layer: missing {', '.join(missing)} in {text!r}")
    n = batch if batch is not None else values.get("n", 1)
    spec = ConvSpec(n=n, c=values["c"], h=values["h"], w=values["w"], k=values["k"], r=values["r"],
                    s=values["s"], stride=as_pair(values.get("stride", 1), "stride"), padding=as_pair(values.get("pad", 0), "pad"),
                    padding_end=(values.get("pad_bottom", values.get("pad", 0)), values.get("pad_right", values.get("pad", 0))),
                    dilation=as_pair(values.get("dilation", 1), "dilation"), groups=values.get("groups", 1),
                    bias=bool(values.get("bias", 0)), activation=texts.get("act", "none"),
                    residual=bool(values.get("residual", 0)), layout=texts.get("layout", "NCHW"))
    return NamedLayer("custom", str(spec), spec)


@lru_cache(maxsize=256)
def layer_name(spec: ConvSpec) -> str:
    """A layer's name in the built-in models ("resnet50/res4_3x3", with " n=8" for a batch other
    than 1), or its shape when no built-in model has it."""
    plain = spec.replace(bias=False, activation="none", residual=False, layout="NCHW")
    epilogue = (("+residual" if spec.residual else "") + ("" if spec.activation == "none" else f"+{spec.activation}")
                + ("" if spec.layout == "NCHW" else f" {spec.layout}"))
    for model in model_names():
        for layer in model_layers(model, spec.n):
            if layer.spec == plain:
                return layer.label + epilogue + ("" if spec.n == 1 else f" n={spec.n}")
    return str(spec)


def layer_text(spec: ConvSpec) -> str | None:
    """The key=value form parse_layer reads back as this spec, or None when it has none (stride,
    dilation or leading padding that differ between height and width)."""
    if len({*spec.stride}) > 1 or len({*spec.dilation}) > 1 or len({*spec.padding}) > 1:
        return None
    parts = [f"n={spec.n}", f"c={spec.c}", f"h={spec.h}", f"w={spec.w}", f"k={spec.k}", f"r={spec.r}", f"s={spec.s}"]
    optional = [("stride", spec.stride[0], 1), ("pad", spec.padding[0], 0), ("pad_bottom", spec.bottom_right[0], spec.padding[0]),
                ("pad_right", spec.bottom_right[1], spec.padding[1]), ("dilation", spec.dilation[0], 1),
                ("groups", spec.groups, 1), ("bias", int(spec.bias), 0), ("residual", int(spec.residual), 0),
                ("act", spec.activation, "none"), ("layout", spec.layout, "NCHW")]
    parts += [f"{key}={value}" for key, value, default in optional if value != default]
    return ",".join(parts)
