"""Fixed-point packing of a whole model update into CKKS slot vectors (numpy only).

Each site quantizes its full weights times its aggregation weight p_i onto a per-tensor
fixed-point frame that every site derives from the same reference (the global model all
sites hold), so the server's ciphertext sum is the sum of the integers, and a decrypting
site recovers sum_i p_i w_i exactly up to the fixed-point step 2**e_t / 2**magnitude_bits.

Several signed integer fields share one CKKS slot (slot = sum_k f_k * 2**(field_bits*k)),
which is what brings a ciphertext near 4x the fp32 bytes: one CKKS slot costs about
16 bytes at one data prime, so two 4-byte values per slot give ~4x instead of ~8x.
Each field has one sign bit and one carry bit over the frame: a site's |q| is at most
p_i * 2**magnitude_bits and the p_i of a round sum to 1, so the sum of all sites stays
below 2**(field_bits - 1) and fields never bleed into each other.

After the tensors comes a canary: p_i itself on the frame 2**0. After aggregation it
decodes to sum_i p_i, which the decrypting site divides by (a round missing a site is still
a weighted mean) and checks: a ciphertext under another key, or an altered sum, decodes to
garbage there. Last come TAG_FIELDS contribution tags: pseudorandom integers in
[-tag_bound, tag_bound] that only holders of the hospitals' key can compute
(hospital_fl.privacy.he), one vector per site and round. After aggregation they decode to
the sum of the summed sites' tags, which proves to a decrypting site which sites' updates
the aggregate holds, each exactly once.

One module (~490 lines): the packing layout and its inverse must change together; a split would
let a site pack with one layout and unpack with another.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from hospital_fl.errors import InputError

__all__ = [
    "PackingConfig",
    "Layout",
    "frame_exponents",
    "layout_for",
    "quantize",
    "pack",
    "unpack",
    "dequantize",
    "CANARY_EXPONENT",
    "WEIGHT_TOLERANCE",
    "TAG_FIELDS",
    "MAX_TAGGED_SITES",
    "tag_bound",
    "canary_units",
]

# The canary (the site's aggregation weight) is quantized on the frame 2**0 = [-1, 1].
CANARY_EXPONENT = 0
# A decoded sum of weights may exceed 1 by rounding of the per-site weights, never more.
WEIGHT_TOLERANCE = 1e-3
# Contribution tags per update: 8 fields of 12 bits at the defaults (~96 bits to guess).
TAG_FIELDS = 8
# The tags of this many sites still sum inside a field (the tag range shrinks to make room).
MAX_TAGGED_SITES = 64
# float64 holds integers exactly up to 2**53; a packed slot must stay below that.
_FLOAT_EXACT_BITS = 52
_NUMERIC_KINDS = "biuf"


@dataclass(frozen=True)
class PackingConfig:
    """How integers are laid into CKKS slots.

    Attributes:
        slots: CKKS slots per ciphertext (poly_modulus_degree / 2).
        field_bits: bits per signed integer field (one sign and one carry bit included).
        fields_per_slot: integer fields packed into one slot.
        headroom_bits: the frame of a tensor is 2**headroom_bits times its reference's
            max |value| (rounded up to a power of two), room for the local update to grow.
        floor_exponent: the smallest frame exponent before headroom, so near-zero
            tensors (fresh biases) still get a frame their trained values fit in.
    """

    slots: int = 4096
    field_bits: int = 18
    fields_per_slot: int = 2
    headroom_bits: int = 2
    floor_exponent: int = 0

    def __post_init__(self):
        checks = [
            (
                "packing.slots",
                self.slots,
                _is_int(self.slots) and self.slots >= 1024 and self.slots & (self.slots - 1) == 0,
                "it must be a power of two >= 1024 (poly_modulus_degree / 2)",
                "use 4096 (poly_modulus_degree 8192)",
            ),
            (
                "packing.field_bits",
                self.field_bits,
                _is_int(self.field_bits) and 8 <= self.field_bits <= 30,
                "it must be an integer in 8..30",
                "use 18",
            ),
            (
                "packing.fields_per_slot",
                self.fields_per_slot,
                _is_int(self.fields_per_slot) and 1 <= self.fields_per_slot <= 4,
                "it must be an integer in 1..4",
                "use 2",
            ),
            (
                "packing.headroom_bits",
                self.headroom_bits,
                _is_int(self.headroom_bits) and 0 <= self.headroom_bits <= 8,
                "it must be an integer in 0..8",
                "use 2",
            ),
            (
                "packing.floor_exponent",
                self.floor_exponent,
                _is_int(self.floor_exponent) and -16 <= self.floor_exponent <= 8,
                "it must be an integer in -16..8",
                "use 0",
            ),
        ]
        for name, value, ok, rule, fix in checks:
            if not ok:
                raise InputError(name, value, rule, fix)
        if self.field_bits * self.fields_per_slot > _FLOAT_EXACT_BITS:
            raise InputError(
                "packing.fields_per_slot",
                self.fields_per_slot,
                f"fields_per_slot * field_bits = {self.field_bits * self.fields_per_slot} must be "
                f"<= {_FLOAT_EXACT_BITS} so a packed slot is an exact float64",
                "use fewer or narrower fields",
            )

    @property
    def magnitude_bits(self) -> int:
        """Bits of |q| for one frame: field_bits less one sign and one carry bit."""
        return self.field_bits - 2

    @property
    def values_per_chunk(self) -> int:
        """Integers carried by one ciphertext."""
        return self.slots * self.fields_per_slot


@dataclass(frozen=True)
class Layout:
    """Which tensors the flat integer vector holds, in order, and their frames.

    Every site of a round must produce the same layout (same tensors, shapes, dtypes and
    frame exponents), or the server would add unrelated integers.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    exponents: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "shapes", tuple(tuple(s) for s in self.shapes))
        object.__setattr__(self, "dtypes", tuple(self.dtypes))
        object.__setattr__(self, "exponents", tuple(self.exponents))
        n = len(self.names)
        if not (len(self.shapes) == len(self.dtypes) == len(self.exponents) == n):
            raise InputError(
                "layout",
                (n, len(self.shapes), len(self.dtypes), len(self.exponents)),
                "names, shapes, dtypes and exponents must have one entry per tensor",
                "build the layout with layout_for()",
            )
        if len(set(self.names)) != n or not all(isinstance(x, str) for x in self.names):
            raise InputError("layout.names", self.names, "tensor names must be unique strings", "use layout_for()")
        for name, shape, dtype, exponent in zip(self.names, self.shapes, self.dtypes, self.exponents):
            if not all(_is_int(d) and d >= 0 for d in shape):
                raise InputError(
                    f"layout shape of {name}", shape, "dimensions must be integers >= 0", "use layout_for()"
                )
            if not _is_numeric_dtype(dtype):
                raise InputError(
                    f"layout dtype of {name}", dtype, "it must be a numeric numpy dtype name", "use layout_for()"
                )
            if not _is_int(exponent) or abs(exponent) > 1024:
                raise InputError(
                    f"layout exponent of {name}", exponent, "it must be an integer in -1024..1024", "use layout_for()"
                )

    @property
    def sizes(self) -> tuple[int, ...]:
        """Values per tensor, in layout order."""
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def canary_index(self) -> int:
        """Position of the canary (the weight p_i) in the flat vector; the tags follow it."""
        return sum(self.sizes)

    @property
    def total(self) -> int:
        """Integers in the flat vector: every tensor's values, the canary and the tags."""
        return sum(self.sizes) + 1 + TAG_FIELDS

    def to_json(self) -> dict:
        """Plain JSON types only (lists of str/int)."""
        return {
            "names": list(self.names),
            "shapes": [list(s) for s in self.shapes],
            "dtypes": list(self.dtypes),
            "exponents": list(self.exponents),
        }

    @classmethod
    def from_json(cls, data: object) -> Layout:
        """The layout to_json() wrote; InputError on anything else."""
        keys = ("names", "shapes", "dtypes", "exponents")
        if not isinstance(data, Mapping) or set(data) != set(keys):
            shown = sorted(data) if isinstance(data, Mapping) else type(data).__name__
            raise InputError("layout", shown, f"it must be a dict with exactly the keys {keys}", "use Layout.to_json()")
        if not all(isinstance(data[k], (list, tuple)) for k in keys) or not all(
            isinstance(s, (list, tuple)) for s in data["shapes"]
        ):
            raise InputError(
                "layout", "non-list fields", "names, shapes, dtypes and exponents must be lists", "use Layout.to_json()"
            )
        return cls(
            names=tuple(data["names"]),
            shapes=tuple(tuple(s) for s in data["shapes"]),
            dtypes=tuple(data["dtypes"]),
            exponents=tuple(data["exponents"]),
        )

    def check_same(self, other: Layout, what: str) -> None:
        """InputError naming the first difference between this layout and ``other``."""
        if self.names != other.names:
            mine, theirs = set(self.names), set(other.names)
            missing, extra = sorted(mine - theirs), sorted(theirs - mine)
            if missing or extra:
                shown = f"missing {missing[:3]}" if missing else f"extra {extra[:3]}"
            else:
                shown = "the same tensors in another order"
            raise InputError(
                what, shown, "its tensors must be those of the reference layout", "every site must send the same model"
            )
        for field in ("shapes", "dtypes", "exponents"):
            for name, a, b in zip(self.names, getattr(self, field), getattr(other, field)):
                if a != b:
                    fix = (
                        "every site must derive frames from the same global model and packing settings"
                        if field == "exponents"
                        else "every site must send the same model"
                    )
                    raise InputError(what, f"{field[:-1]} {b} for {name}", f"the reference layout has {a}", fix)


def frame_exponents(reference: Mapping[str, np.ndarray], cfg: PackingConfig) -> dict[str, int]:
    """Per tensor e_t = max(ceil(log2 max|g_t|), floor_exponent) + headroom_bits.

    Derived from the reference (the global model every site holds) so all sites share the
    frames; a zero or empty tensor gets floor_exponent + headroom_bits. An integer tensor
    (a counter such as BatchNorm's num_batches_tracked, 0 in a fresh model and growing by
    whole batches every round) gets at least 2**magnitude_bits, a step of at most 1.
    """
    out = {}
    for name, value in reference.items():
        arr = _numeric_array(f"reference tensor {name}", value)
        peak = float(np.abs(arr).max()) if arr.size else 0.0
        if not math.isfinite(peak):
            raise InputError(
                f"reference tensor {name}", peak, "its values must be finite", "send a global model without NaN/inf"
            )
        exponent = cfg.floor_exponent if peak == 0.0 else max(_ceil_log2(peak), cfg.floor_exponent)
        exponent += cfg.headroom_bits
        if arr.dtype.kind in "biu":
            exponent = max(exponent, cfg.magnitude_bits)
        out[name] = exponent
    return out


def layout_for(params: Mapping[str, np.ndarray], exponents: Mapping[str, int]) -> Layout:
    """The layout of ``params`` (sorted by name, so every site orders tensors alike)."""
    names = sorted(params)
    missing = [n for n in names if n not in exponents]
    if missing:
        raise InputError(
            "update tensors",
            missing[:5],
            "every tensor of the update needs a frame from the reference model",
            "send an update with the global model's tensors",
        )
    arrays = [_numeric_array(f"update tensor {n}", params[n]) for n in names]
    return Layout(
        names=tuple(names),
        shapes=tuple(tuple(int(d) for d in a.shape) for a in arrays),
        dtypes=tuple(a.dtype.name for a in arrays),
        exponents=tuple(int(exponents[n]) for n in names),
    )


def tag_bound(cfg: PackingConfig) -> int:
    """The largest |tag| a site sends: MAX_TAGGED_SITES of them still fit a signed field."""
    return max(1, (2 ** (cfg.field_bits - 1) - 1) // MAX_TAGGED_SITES)


def canary_units(weight: float, cfg: PackingConfig) -> int:
    """The integer a site's weight p_i becomes in the canary field."""
    return round(math.ldexp(float(weight), cfg.magnitude_bits - CANARY_EXPONENT))


def quantize(
    params: Mapping[str, np.ndarray],
    layout: Layout,
    weight: float,
    cfg: PackingConfig,
    tags: np.ndarray | None = None,
) -> np.ndarray:
    """q = round(p * x / 2**e_t * 2**magnitude_bits) for every value, then the canary and the
    contribution ``tags`` (TAG_FIELDS integers within ±tag_bound; zeros when None), as int64.

    A value outside its frame raises instead of clipping: the aggregate would be wrong.
    """
    tags = np.zeros(TAG_FIELDS, dtype=np.int64) if tags is None else np.asarray(tags)
    bound = tag_bound(cfg)
    if tags.shape != (TAG_FIELDS,) or tags.dtype.kind not in "iu" or int(np.abs(tags).max()) > bound:
        raise InputError(
            "contribution tags",
            f"{tags.dtype}{list(tags.shape)}",
            f"they must be {TAG_FIELDS} integers within ±{bound}",
            "derive them with hospital_fl.privacy.he.contribution_tags()",
        )
    if not (isinstance(weight, (int, float, np.floating)) and 0.0 < float(weight) <= 1.0):
        raise InputError(
            "aggregation weight", weight, "it must lie in (0, 1] (the site's share of the round)", "pass n_i / sum n"
        )
    weight = float(weight)
    if set(params) != set(layout.names):
        layout.check_same(layout_for(params, dict(zip(layout.names, layout.exponents))), "update")
    out = np.empty(layout.total, dtype=np.int64)
    offset = 0
    mb = cfg.magnitude_bits
    for name, shape, dtype, exponent, size in zip(
        layout.names, layout.shapes, layout.dtypes, layout.exponents, layout.sizes
    ):
        arr = _numeric_array(f"update tensor {name}", params[name])
        if tuple(arr.shape) != shape or arr.dtype.name != dtype:
            raise InputError(
                f"update tensor {name}",
                f"{arr.dtype.name}{list(arr.shape)}",
                f"it must be {dtype}{list(shape)} as in the layout",
                "send the global model's tensors",
            )
        x = arr.reshape(-1).astype(np.float64, copy=False)
        peak = float(np.abs(x).max()) if size else 0.0
        frame = 2.0**exponent
        if not peak <= frame:  # also catches NaN
            raise InputError(
                f"update tensor {name}",
                f"max |value| {peak:.6g}",
                f"it must lie within its fixed-point frame ±2**{exponent} = ±{frame:.6g} "
                "(derived from the global model); values are never clipped",
                "raise headroom_bits so the frames leave more room, or find why the tensor grew this much",
            )
        out[offset : offset + size] = np.rint(x * math.ldexp(weight, mb - exponent))
        offset += size
    out[offset] = canary_units(weight, cfg)
    out[offset + 1 :] = tags
    return out


def pack(ints: np.ndarray, cfg: PackingConfig) -> np.ndarray:
    """Chunks of slots (float64, shape (n_chunks, slots)); slot = sum_k f_k * 2**(field_bits*k).

    Field k of slot j in chunk c is ints[c * values_per_chunk + k * slots + j]; the last
    chunk is zero-padded.
    """
    ints = np.asarray(ints)
    if ints.ndim != 1 or ints.dtype.kind not in "iu":
        raise InputError(
            "packed integers", f"{ints.dtype}{list(ints.shape)}", "they must be a flat integer array", "use quantize()"
        )
    limit = 2 ** (cfg.field_bits - 1)
    if ints.size and int(np.abs(ints).max()) >= limit:
        raise InputError(
            "packed integers",
            int(np.abs(ints).max()),
            f"each must satisfy |q| < 2**{cfg.field_bits - 1} to fit a signed field",
            "quantize with magnitude_bits = field_bits - 2",
        )
    n_chunks = max(1, -(-ints.size // cfg.values_per_chunk))
    padded = np.zeros(n_chunks * cfg.values_per_chunk, dtype=np.int64)
    padded[: ints.size] = ints
    fields = padded.reshape(n_chunks, cfg.fields_per_slot, cfg.slots)
    slots = fields[:, 0, :].copy()
    for k in range(1, cfg.fields_per_slot):
        slots += fields[:, k, :] << (cfg.field_bits * k)
    return slots.astype(np.float64)


def unpack(chunks: np.ndarray, total: int, cfg: PackingConfig) -> np.ndarray:
    """The first ``total`` integers of decoded chunks, by rounding from the top field down.

    Exact while every field |f| < 2**(field_bits - 1) and the decoding error is < 0.5. A top
    field out of that range cannot come from a valid sum: the slots are garbage (another
    key, or altered ciphertexts) and InputError is raised.
    """
    v = np.array(chunks, dtype=np.float64, ndmin=2)
    if v.ndim != 2 or v.shape[1] != cfg.slots:
        raise InputError(
            "decoded chunks", list(v.shape), f"they must have shape (n_chunks, {cfg.slots})", "decode every ciphertext"
        )
    if not 0 < total <= v.shape[0] * cfg.values_per_chunk:
        raise InputError(
            "packed value count",
            total,
            f"it must lie in 1..{v.shape[0] * cfg.values_per_chunk}",
            "use the layout's total",
        )
    fields = np.empty((v.shape[0], cfg.fields_per_slot, cfg.slots), dtype=np.int64)
    limit = 2.0 ** (cfg.field_bits - 1)
    for k in range(cfg.fields_per_slot - 1, -1, -1):
        unit = 2.0 ** (cfg.field_bits * k)
        top = np.rint(v / unit)
        if k == cfg.fields_per_slot - 1 and not bool(np.all(np.abs(top) < limit)):
            raise InputError(
                "decrypted update",
                "fields out of range",
                "its slots decode to garbage: it was encrypted under a different context/key, or altered",
                "every site must use the consortium's kits (one provisioning), and the server must not alter updates",
            )
        fields[:, k, :] = top
        if k:
            v = v - top * unit
    return fields.reshape(-1)[:total].copy()


def dequantize(ints: np.ndarray, layout: Layout, cfg: PackingConfig) -> tuple[dict[str, np.ndarray], float]:
    """(sum_i p_i w_i / sum_i p_i per tensor in its dtype and shape, sum_i p_i from the canary).

    Integer tensors are restored by rounding the weighted mean.
    """
    ints = np.asarray(ints)
    if ints.ndim != 1 or ints.size != layout.total:
        raise InputError(
            "unpacked integers", list(ints.shape), f"they must be a flat array of {layout.total}", "use unpack()"
        )
    weight = math.ldexp(float(ints[layout.canary_index]), CANARY_EXPONENT - cfg.magnitude_bits)
    if not 0.0 < weight <= 1.0 + WEIGHT_TOLERANCE:
        raise InputError(
            "decrypted update",
            f"sum of weights {weight:.6g}",
            "it must lie in (0, 1]; it decodes outside when the update was encrypted under a different "
            "context/key or was altered",
            "every site must use the consortium's kits (one provisioning), and the server must not alter updates",
        )
    out = {}
    offset = 0
    for name, shape, dtype, exponent, size in zip(
        layout.names, layout.shapes, layout.dtypes, layout.exponents, layout.sizes
    ):
        values = ints[offset : offset + size].astype(np.float64) * (
            math.ldexp(1.0, exponent - cfg.magnitude_bits) / weight
        )
        target = np.dtype(dtype)
        if target.kind in "biu":
            values = np.rint(values)
        out[name] = values.astype(target).reshape(shape)
        offset += size
    return out, weight


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_numeric_dtype(name: object) -> bool:
    try:
        return isinstance(name, str) and np.dtype(name).kind in _NUMERIC_KINDS
    except TypeError:
        return False


def _numeric_array(name: str, value: object) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in _NUMERIC_KINDS:
        raise InputError(name, str(arr.dtype), "it must be a numeric array", "convert the tensor to numpy first")
    return arr


def _ceil_log2(x: float) -> int:
    """Exact ceil(log2(x)) for x > 0 (no floating-point log)."""
    mantissa, exponent = math.frexp(x)  # x = mantissa * 2**exponent, 0.5 <= mantissa < 1
    return exponent - 1 if mantissa == 0.5 else exponent
