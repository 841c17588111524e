"""Bytes kept for the backward pass, per fine-tuned layer and method (torch-free).

Two accountings:
- paper: the inputs of the fine-tuned convs only, as the paper's tables count them;
- full:  everything the backward of the fine-tuned part really keeps: the conv
  inputs (compressed or not), one bit per element for every activation mask
  (ReLU/ReLU6/clamp, hardsigmoid, leaky ReLU, also after a residual add) downstream of the
  first fine-tuned conv, the float32 input of every hardswish and silu and output of every
  sigmoid there, each factor of a multiply (a squeeze-excitation gate and the map it
  scales) that the other input's gradient needs and no such act of a fine-tuned conv
  gives, a squeeze-excitation Linear's input (all kept whole: a conv input's compression
  does not reach them), the argmax
  (int32) of every max-pool in the fine-tuned part, and the classifier head's: each
  Linear's float32 input and what its activations keep.  Budgets use this one.

Floats are float32 (4 bytes). MiB = 2**20 bytes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from math import ceil, prod
from typing import Optional, Sequence

from .arch import ACTIVATIONS, MASKING_ACTS, ConvLayer, Network
from .decomposition import check_eps
from .methods import method as method_row

FLOAT_BYTES = 4
MASK_BITS = 1      # masks are held bit-packed per sample: ceil(C*H*W / 8) bytes a sample
INDEX_BYTES = 4    # a max-pool's argmax: int32, one per pooled element
MIB = 2 ** 20


def mib(nbytes: int) -> str:
    """Bytes as MiB with two decimals, rounded half up (as the paper prints them)."""
    # here, not at the top: the board's step never prints MiB, and decimal is 0.27 MiB of RSS
    from decimal import ROUND_HALF_UP, Decimal
    return str((Decimal(nbytes) / MIB).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


@dataclass
class LayerPlan:
    name: str
    input_shape: tuple
    method: str
    rank_per_mode: Optional[tuple]   # hosvd: (K1..K4); svd: (k,); else None
    paper_bytes: int                 # conv input as kept (compressed or not)
    mask_bytes: int                  # activation masks / pool indices after this layer
    full_bytes: int                  # paper_bytes + mask_bytes (+ classifier input)
    whole_bytes: int = 0             # of mask_bytes: float32 tensors kept whole, not
                                     # compressed (whole_bytes())


@dataclass
class Plan:
    model: str
    method: str
    batch_size: int
    input_size: tuple
    eps: Optional[float]
    rank_basis: str                  # how ranks were obtained: exact / fixed / bound
    layers: list = field(default_factory=list)

    @property
    def paper_bytes(self) -> int:
        return sum(layer.paper_bytes for layer in self.layers)

    @property
    def full_bytes(self) -> int:
        return sum(layer.full_bytes for layer in self.layers)

    def to_json(self) -> dict:
        return {"model": self.model, "method": self.method, "batch_size": self.batch_size,
                "input_size": list(self.input_size), "eps": self.eps,
                "rank_basis": self.rank_basis, "paper_bytes": self.paper_bytes,
                "full_bytes": self.full_bytes, "paper_mib": mib(self.paper_bytes),
                "full_mib": mib(self.full_bytes),
                "layers": [dict(asdict(layer), input_shape=list(layer.input_shape),
                                rank_per_mode=(list(layer.rank_per_mode)
                                               if layer.rank_per_mode else None))
                           for layer in self.layers]}

    @classmethod
    def from_json(cls, data: dict) -> "Plan":
        """The plan ``to_json`` gave (the totals are recomputed from its layers)."""
        layers = [LayerPlan(**dict(layer, input_shape=tuple(layer["input_shape"]),
                                   rank_per_mode=(tuple(layer["rank_per_mode"])
                                                  if layer["rank_per_mode"] else None)))
                  for layer in data["layers"]]
        return cls(data["model"], data["method"], data["batch_size"], tuple(data["input_size"]),
                   data["eps"], data["rank_basis"], layers)


RANK_BASES = {
    "exact": "sizes are exact (no data-dependent ranks)",
    "fixed": "ranks fixed by --ranks",
    "bound": "eps ranks depend on the data: reported sizes use the worst case "
             "(full multilinear rank min(d_n, prod of the other dims), capped by --rank-cap)",
}


def mask_bytes(layer: ConvLayer, batch: int, fine_tuned) -> int:
    """What the backward keeps after this conv besides the next conv's input: the masks of its
    activations (1 bit an element), the float32 tensors kept whole (``whole_bytes``), and the
    argmax of a max-pool after it. fine_tuned: the names of the fine-tuned convs."""
    total = whole_bytes(layer, batch, fine_tuned)
    for act in layer.acts:
        if act.get("type") in MASKING_ACTS or ACTIVATIONS.get(act.get("type")) == "mask":
            total += batch * ceil(act_elements(layer, act) * MASK_BITS / 8)
    if layer.maxpool_after:
        p = layer.maxpool_after
        h, w = p.get("output_hw") or ((s + 2 * p["padding"] - p["kernel"]) // p["stride"] + 1
                                      for s in layer.output_hw)
        total += batch * layer.out_ch * h * w * INDEX_BYTES
    return total


def whole_bytes(layer: ConvLayer, batch: int, fine_tuned) -> int:
    """The float32 tensors after this conv that the backward keeps whole (a conv input's
    compression does not reach them): the input of a hardswish or silu, the output of a
    sigmoid (``arch.ACTIVATIONS``), a squeeze-excitation Linear's input, each factor of a
    multiply (a gate, the map it scales) whose other input needs a gradient, but one that
    such an act of a fine-tuned conv gives (recomputed from what it keeps)."""
    kept = sum(act_elements(layer, act) for act in layer.acts
               if ACTIVATIONS.get(act.get("type")) in ("input", "output"))
    kept += sum(n for n, given_by, needed_with in layer.whole
                if needed_with in fine_tuned and given_by not in fine_tuned)
    return kept * batch * FLOAT_BYTES


def act_elements(layer: ConvLayer, act: dict) -> int:
    """Elements of one sample of an activation after this conv: the conv's output's, unless
    the act says (after a concatenation, say)."""
    return act.get("elements") or prod(layer.output_shape(1))


def layer_ranks(method: str, shape: tuple, ranks, rank_cap) -> Optional[tuple]:
    """Ranks used for sizing: fixed ones if given, else the worst case, capped (None for a
    method without ranks)."""
    sizing = method_row(method).ranks
    return sizing(shape, ranks, rank_cap) if sizing else None


def plan(net: Network, n_layers: int, method: str, batch_size: int, input_size,
         eps: Optional[float] = None, ranks: Optional[Sequence[int]] = None,
         rank_cap=None) -> Plan:
    """Memory kept for backward when the last n_layers convs (and the classifier) are fine-tuned.

    hosvd/svd: give ranks (fixed: exact sizes) or eps (data-dependent: worst-case bound).
    """
    row = method_row(method)
    count = len(net.convs)
    if not 1 <= n_layers <= count:
        raise ValueError(f"--layers must be between 1 and {count} ({net.name} has {count} convs), "
                         f"got {n_layers}")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if eps is not None:
        check_eps(eps)
    if row.ranks:
        if ranks is None and eps is None:
            raise ValueError(f"{method} needs --eps or --ranks")
        basis = "fixed" if ranks is not None else "bound"
    else:
        basis = "exact"
    result = Plan(net.name, method, batch_size, tuple(input_size) if not isinstance(input_size, int)
                  else (input_size, input_size), eps, basis)
    fine_tuned = {layer.name for layer in net.convs[-n_layers:]}
    for layer in net.convs[-n_layers:]:
        shape = layer.input_shape(batch_size)
        rank_per_mode = layer_ranks(method, shape, ranks, rank_cap)
        paper = row.kept_floats(shape, rank_per_mode, layer.stride) * FLOAT_BYTES
        masks = mask_bytes(layer, batch_size, fine_tuned)
        result.layers.append(LayerPlan(layer.name, shape, method, rank_per_mode, paper, masks,
                                       paper + masks,
                                       whole_bytes(layer, batch_size, fine_tuned)))
    head = batch_size * (net.head_floats * FLOAT_BYTES
                         + sum(ceil(n * MASK_BITS / 8) for n in net.head_masks))
    result.layers.append(LayerPlan("classifier", (batch_size, net.classifier_in), "vanilla", None,
                                   0, 0, head))
    return result


def plan_table(result: Plan, n_layers: int) -> str:
    """The per-layer memory table of a Plan, as `actcomp plan` and `actcomp export` print it."""
    size = result.input_size
    header = f"{'layer':<24} {'input (B,C,H,W)':<22} {'ranks':<18} {'paper MiB':>10} {'full MiB':>10}"
    lines = [f"{result.model}: last {n_layers} convs + classifier, method {result.method}"
             + (f", eps {result.eps}" if result.eps is not None else "")
             + f", batch {result.batch_size}, input {size[0]}x{size[1]}, float32",
             f"ranks: {RANK_BASES[result.rank_basis]}", header, "-" * len(header)]
    for layer in result.layers:
        ranks = ",".join(map(str, layer.rank_per_mode)) if layer.rank_per_mode else "-"
        lines.append(f"{layer.name:<24} {str(tuple(layer.input_shape)):<22} {ranks:<18} "
                     f"{mib(layer.paper_bytes):>10} {mib(layer.full_bytes):>10}")
    lines += ["-" * len(header),
              f"{'total':<66} {mib(result.paper_bytes):>10} {mib(result.full_bytes):>10}",
              "paper = conv inputs only (the paper's tables); full = also activation masks and "
              "the classifier input (what a budget must hold)"]
    whole = sum(layer.whole_bytes for layer in result.layers)
    if whole:
        lines.append(f"of the full total, {mib(whole)} MiB are float32 tensors kept whole, "
                     f"uncompressed, for their backward: the input of each hardswish and silu, "
                     f"the output of each sigmoid, a multiply's factors that no such act gives, "
                     f"a squeeze-excitation Linear's input")
    return "\n".join(lines)
