"""The registry of RWKV architectures, and version detection from a checkpoint's keys alone.

Detection is one declared table: REFUSED (variants recognised and refused by name) is checked first, then the
registered architectures newest first, each by its `markers`; the first that matches wins, and its strict mapping
then rejects any key of another version (mixed-version checkpoints) with an error naming the tensor. No environment
variable is involved (the `rwkv` pip package needs RWKV_V7_ON; we read the keys).

Adding a version is one package under arch/ (mapping, step, sequence, fixtures), one runtime_ref file and one line
in ARCHITECTURES below.
"""

from __future__ import annotations

from ..errors import CheckpointError, UnsupportedVersionError
from .base import Architecture, Checkpoint, ModelDims, StateTensor  # noqa: F401  (re-exported)

# (key suffix, what it is): checkpoints we recognise and do not export, refused by name before any mapping
REFUSED: tuple[tuple[str, str], ...] = (
    (".ffn.enn.weight", "an RWKV-8 checkpoint (ffn.enn)"),
    (".ffn.s_emb.weight", "an RWKV-7 'DeepEmbed' checkpoint (ffn.s_emb)"),
    (".ffn.s_emb_x.weight", "an RWKV-7 'DeepEmbed' checkpoint (ffn.s_emb_x)"),
    (".ffn.s0", "an RWKV-7 'DeepEmbed' checkpoint (ffn.s0/s1/s2)"),
    (".ffn.s1", "an RWKV-7 'DeepEmbed' checkpoint (ffn.s0/s1/s2)"),
)


# versions recognised by a marker, newest first, for a clear refusal of any that is not registered (all are, today)
RECOGNISED: tuple[tuple[str, str], ...] = (
    ("RWKV-7", ".att.k_k"),
    ("RWKV-6", ".att.time_maa_x"),
    ("RWKV-5.2", ".att.time_faaaa"),
)


def _registry() -> list[Architecture]:
    from .rwkv4 import RWKV4Arch
    from .rwkv5 import RWKV5Arch
    from .rwkv6 import RWKV6Arch
    from .rwkv7 import RWKV7Arch

    return [RWKV7Arch(), RWKV6Arch(), RWKV5Arch(), RWKV4Arch()]


# newest first: the order detection tries them in
ARCHITECTURES: list[Architecture] = _registry()
BY_VERSION: dict[str, Architecture] = {a.version: a for a in ARCHITECTURES}


def get(version: str) -> Architecture:
    try:
        return BY_VERSION[str(version)]
    except KeyError:
        raise UnsupportedVersionError(f"RWKV-{version} is not supported; supported: "
                                      f"{', '.join(a.title for a in ARCHITECTURES)}") from None


def detect(keys) -> Architecture:
    """The architecture of a checkpoint from its key names; a one-line error for a refused or unknown one."""
    keys = set(keys)
    for suffix, what in REFUSED:
        hit = next((k for k in sorted(keys) if k.endswith(suffix) or (suffix + ".") in k), None)
        if hit:
            raise UnsupportedVersionError(f"this is {what}, which rwkv-export does not export (tensor '{hit}')")
    for arch in ARCHITECTURES:
        if arch.matches(keys):
            return arch
    if any(k.endswith(".att.ln_x.weight") for k in keys) and not any(k.endswith(".att.time_faaaa") for k in keys):
        raise UnsupportedVersionError("this is an RWKV-5.0/5.1 checkpoint (att.ln_x without att.time_faaaa); only "
                                      "RWKV-5.2 of the v5 family is supported")
    for a in ARCHITECTURES:
        have = [m for m in a.markers if any(k.endswith("." + m) for k in keys)]
        if have and len(have) < len(a.markers):
            lacks = next(m for m in a.markers if m not in have)
            raise CheckpointError(f"incomplete {a.title} checkpoint: it has '{have[0]}' tensors but no '{lacks}' "
                                  f"(an {a.title} file has all of {', '.join(a.markers)})")
    registered = {a.title for a in ARCHITECTURES}
    for title, marker in RECOGNISED:
        if title not in registered and any(k.endswith(marker) for k in keys):
            raise UnsupportedVersionError(f"this is an {title} checkpoint, which this rwkv-export does not export "
                                          f"(supported: {', '.join(a.title for a in ARCHITECTURES)})")
    raise CheckpointError("not an RWKV checkpoint: no key identifies an RWKV version (expected e.g. "
                          "'blocks.0.att.time_first' for RWKV-4 or 'blocks.0.att.k_k' for RWKV-7)")


def foreign_key_hint(key: str, arch: Architecture) -> str:
    """' (a key of RWKV-6: the file mixes versions)' when an unexpected key marks another version, else ''."""
    marks = [(o.title, "." + m) for o in ARCHITECTURES if o is not arch for m in o.markers]
    marks += [(title, m) for title, m in RECOGNISED if title != arch.title]
    marks.append(("RWKV-5", ".att.ln_x.weight"))
    for title, m in marks:
        if key.endswith(m):
            return f" (a key of {title}: the file mixes versions)"
    return ""
