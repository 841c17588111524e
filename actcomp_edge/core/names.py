"""The names of the tensors a training step passes between graphs, numpy and checkpoints.

Graph tensors (B: the batch; <t> a tensor of the program, <p> a trainable param):

    d/<t>                 gradient of the loss w.r.t. <t> ("dlogits" for the logits)
    grad/<p>              gradient of <p>, summed over the batch
    state/<kind>/<p>      optimizer state of <p> (momentum, exp_avg, exp_avg_sq)
    new/<p>, new/state/<kind>/<p>   what the update graph makes of them
    <layer>/kept/<piece>  what the backward keeps of fine-tuned conv <layer>'s input
    <t>/mask_bits, <t>/act_saved, <t>/argmax, <t>/factor_<i>   what the backward keeps
                          of an activation, max-pool or multiply besides the kept pieces
    <t>/mask_bool         a mask as the graphs make and read it; the runner holds it as
                          <t>/mask_bits between them (``stored``)

Checkpoint arrays: param/<p>, opt/<state name>, tracker/<layer>/<key>.
"""
from __future__ import annotations

GRAD, NEW, STATE = "grad/", "new/", "state/"
PARAM, OPT, TRACKER = "param/", "opt/", "tracker/"


def d(tensor: str) -> str:
    """The loss gradient w.r.t. tensor, float32 of its shape ("dlogits" for the logits)."""
    return "dlogits" if tensor == "logits" else f"d/{tensor}"


def grad(param: str) -> str:
    """The gradient of trainable param, float32 of its shape, summed over the batch."""
    return GRAD + param


def new(name: str) -> str:
    """The update graph's new value of a param or state tensor name, float32 of its shape."""
    return NEW + name


def state(kind: str, param: str) -> str:
    """Optimizer state `kind` (momentum, exp_avg, exp_avg_sq) of param, float32 of its shape."""
    return f"{STATE}{kind}/{param}"


def kept(layer: str, piece: str) -> str:
    """Piece `piece` of what the backward keeps of fine-tuned conv layer's input, float32
    (the method's pieces: a core and factors, or the input itself)."""
    return f"{layer}/kept/{piece}"


def mask_bits(tensor: str) -> str:
    """The backward mask of clip or act output tensor: uint8 (B, ceil(C*H*W / 8)), 1 bit an
    element, most significant first (np.packbits of the mask reshaped (B, -1), axis 1)."""
    return tensor + "/mask_bits"


def mask_bool(tensor: str) -> str:
    """The backward mask of clip or act output tensor as the graphs see it: bool (B, *shape),
    read by a backward graph and made by a forward one, or by the runner from the tensor
    itself where it is a fine-tuned conv's input (manifest ``Layer.input_mask``). The runner
    holds it as ``mask_bits`` in between (numpy's packbits: ~20x faster than packing in the
    graph)."""
    return tensor + "/mask_bool"


def act_saved(tensor: str) -> str:
    """What the backward of act output tensor keeps, float32 of its shape: the act's input
    (hardswish, silu) or the output itself (sigmoid)."""
    return tensor + "/act_saved"


def argmax(tensor: str) -> str:
    """Max-pool output tensor's argmax: int32 of its shape, each the flat index within its
    sample (C*H*W) of the input's max."""
    return tensor + "/argmax"


def factor(tensor: str, i: int) -> str:
    """Factor i (0, 1) of the multiply whose output is tensor, float32, kept for the backward."""
    return f"{tensor}/factor_{i}"


def is_mask_bits(name: str) -> bool:
    return name.endswith("/mask_bits")


def is_mask_bool(name: str) -> bool:
    return name.endswith("/mask_bool")


def stored(name: str) -> str:
    """What the runner holds for graph tensor ``name`` between runs: a mask_bool as its
    mask_bits, anything else as itself."""
    return mask_bits(source_of(name)) if is_mask_bool(name) else name


def is_act_saved(name: str) -> bool:
    return name.endswith("/act_saved")


def is_argmax(name: str) -> bool:
    return name.endswith("/argmax")


def is_factor(name: str) -> bool:
    return "/factor_" in name


def is_saved(name: str) -> bool:
    """A mask_bits, mask_bool, act_saved, argmax or factor name: kept for an activation's, a
    max-pool's or a multiply's backward."""
    return is_mask_bits(name) or is_mask_bool(name) or is_act_saved(name) or is_argmax(name) \
        or is_factor(name)


def source_of(name: str) -> str:
    """The tensor a mask_bits, mask_bool, act_saved, argmax or factor name is kept for."""
    return name.rpartition("/")[0]


def is_d(name: str) -> bool:
    """A d/<t> name (the logits' gradient, "dlogits", is not one)."""
    return name.startswith("d/")


def is_grad(name: str) -> bool:
    return name.startswith(GRAD)


def is_new(name: str) -> bool:
    return name.startswith(NEW)


def is_state(name: str) -> bool:
    return name.startswith(STATE)


def param_of(grad_name: str) -> str:
    """The param of a grad/<p> name."""
    return grad_name[len(GRAD):]


def updated_of(new_name: str) -> str:
    """The param or state name of a new/<name> name."""
    return new_name[len(NEW):]


def param(name: str) -> str:
    """Checkpoint array of trainable param name (float32, the param's shape)."""
    return PARAM + name


def opt(name: str) -> str:
    """Checkpoint array of optimizer state name (state/<kind>/<p>)."""
    return OPT + name


def checkpoint_arrays(params: dict, state: dict) -> dict:
    """{param/<p>: array, opt/<state name>: array} of params and optimizer state."""
    return {**{param(k): v for k, v in params.items()}, **{opt(k): v for k, v in state.items()}}


def tracker(layer: str, key: str) -> str:
    """Checkpoint array `key` of fine-tuned layer's tracker (asi's factors)."""
    return f"{TRACKER}{layer}/{key}"


def under(arrays: dict, prefix: str) -> dict:
    """{rest: array} of the arrays whose name is prefix + rest (PARAM, OPT, tracker(layer, ""))."""
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
