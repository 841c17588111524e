"""Device profiles (``profiles/<name>.toml``) and the training-memory accounting checked
against them.

A profile is a TOML file with exactly these keys::

    name             = "Raspberry Pi Zero 2 W"   # string, for people
    ram              = "512MiB"                  # physical RAM: size string or int bytes
    cores            = 4                         # CPU cores, int 1 .. 65536
    budget           = "160MiB"                  # default training budget: size or int bytes
    runtime_baseline = "100MiB"                  # RSS of the idle runner (python, numpy,
                                                 # onnxruntime, the loaded artifact)
    serial_port      = "/dev/ttyGS0"             # the board's port for `--report`
    arch             = "aarch64"                 # `uname -m` of the board
    notes            = "..."                     # optional free text

Sizes are ints (bytes) or strings: "48MiB", "512MB" (10^6), "1.5GiB", "64KiB"; K/M/G alone
are binary; from 1 byte to 2**63 - 1 (TOML's largest int). The budget is what one training
step may add on top of the runtime baseline (the meaning of `actcomp-device train --budget`:
peak RSS growth over the baseline), so budget + runtime_baseline must fit in ram; ram must
be at least 64 MiB. The shipped profiles take budget = (ram - OS reserve - runtime_baseline)
/ 1.5, rounded down: the runner caps onnxruntime's arena at 1.5 x the budget (each file says
its numbers).

`load_profile(path_or_name)` reads and validates one (a bare name resolves to
``profiles/<name>.toml`` of the repository, or of the installed package's data files);
every problem is a one-line `ProfileError` naming the key.

The accounting (`Fit`): a training step needs the activations kept for backward (the
memory model's full accounting), the trainable weights, their gradients (same size) and
the optimizer state (SGD momentum: 1x the weights, AdamW: 2x). It fits when that working
set is within the budget; the margin is budget - working set.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from math import prod
from pathlib import Path

from .arch import pair
from .memory import FLOAT_BYTES, mib


def _profile_dir() -> Path:
    """profiles/ of the checkout, else the copy pip installed (pyproject's data-files)."""
    checkout = Path(__file__).resolve().parents[2] / "profiles"
    installed = Path(sys.prefix) / "share" / "actcomp-edge" / "profiles"
    return checkout if checkout.is_dir() else installed


PROFILE_DIR = _profile_dir()
MIN_RAM = 64 * 2 ** 20
MAX_SIZE = 2 ** 63 - 1
MAX_CORES = 65536
OPTIMIZER_STATE = {"sgd": 1, "adamw": 2}  # state arrays per trainable parameter
UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 2 ** 10,
         "MIB": 2 ** 20, "GIB": 2 ** 30, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}
SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


class ProfileError(ValueError):
    """A device profile that cannot be used (one line, names the key)."""


def parse_size(value) -> int:
    """48MiB, '512MB', '1.5GiB', 1000000 -> bytes (1 .. MAX_SIZE); ValueError otherwise."""
    size = 0
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str):
        m = SIZE_RE.match(value)
        if m and m.group(2).upper() in UNITS:
            size = float(m.group(1)) * UNITS[m.group(2).upper()]  # inf for 400 digits
            size = int(size) if size <= MAX_SIZE else MAX_SIZE + 1
    if 0 < size <= MAX_SIZE:
        return size
    raise ValueError(f"cannot read memory size {_show(value)} (examples: 48MiB, 512MB, 2GiB, "
                     f"or a positive int of bytes up to 2**63 - 1)")


def _show(value) -> str:
    """repr(value), shortened for an error message."""
    try:
        text = repr(value)
    except ValueError:  # an int of more than 4300 digits
        return "an int of more than 4300 digits"
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class Profile:
    name: str
    ram_bytes: int
    cores: int
    budget_bytes: int
    runtime_baseline_bytes: int
    serial_port: str
    arch: str
    notes: str = ""
    path: str = ""

    def to_json(self) -> dict:
        return {"name": self.name, "ram_bytes": self.ram_bytes, "cores": self.cores,
                "budget_bytes": self.budget_bytes,
                "runtime_baseline_bytes": self.runtime_baseline_bytes,
                "serial_port": self.serial_port, "arch": self.arch, "path": self.path}


# key -> (kind, required)
KEYS = {"name": ("str", True), "ram": ("size", True), "cores": ("int", True),
        "budget": ("size", True), "runtime_baseline": ("size", True),
        "serial_port": ("str", True), "arch": ("str", True), "notes": ("str", False)}


def profile_names() -> list:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def resolve(path_or_name) -> Path:
    path = Path(path_or_name)
    name = str(path_or_name)
    if "\0" in name:
        raise ProfileError(f"device profile name {_show(name)} contains a NUL byte")
    try:
        if path.suffix == ".toml" or path.exists() or "/" in name:
            return path
        path = PROFILE_DIR / f"{path_or_name}.toml"
        found = path.is_file()
    except OSError as e:  # e.g. a name too long for the file system
        raise ProfileError(f"cannot read device profile {_show(name)}: {e.strerror or e}") \
            from None
    if not found:
        raise ProfileError(f"unknown device profile {str(path_or_name)!r}: give a .toml file "
                           f"or one of {', '.join(profile_names()) or '(none shipped)'}")
    return path


def load_profile(path_or_name) -> Profile:
    """A validated Profile from a .toml path or a shipped profile's name."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ProfileError("reading device profiles needs tomli on Python < 3.11: "
                               "pip install 'actcomp-edge[host]'") from None
    path = resolve(path_or_name)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ProfileError(f"device profile {path} is not UTF-8 text: {e}") from None
    except OSError as e:
        raise ProfileError(f"cannot read device profile {path}: {e.strerror or e}") from None
    except (ValueError, RecursionError) as e:  # TOMLDecodeError, > 4300 digits, deep nesting
        raise ProfileError(f"device profile {path} is not valid TOML: {e}") from None
    return validate(data, str(path))


def validate(data: dict, where: str = "profile") -> Profile:
    def fail(key, message):
        raise ProfileError(f"{where}: key {_show(key)}: {message}")

    if not isinstance(data, dict):
        raise ProfileError(f"{where}: expected a table of keys, got {type(data).__name__}")
    for key in data:
        if key not in KEYS:
            fail(key, f"unknown key (known: {', '.join(KEYS)})")
    values = {}
    for key, (kind, required) in KEYS.items():
        if key not in data:
            if required:
                fail(key, "missing")
            continue
        value = data[key]
        if kind == "size":
            try:
                value = parse_size(value)
            except ValueError as e:
                fail(key, str(e))
        elif kind == "int" and (not isinstance(value, int) or isinstance(value, bool)):
            fail(key, f"expected an integer, got {_show(value)}")
        elif kind == "str" and not (isinstance(value, str) and (value.strip() or key == "notes")):
            fail(key, f"expected a non-empty string, got {_show(value)}")
        values[key] = value
    if not 1 <= values["cores"] <= MAX_CORES:
        fail("cores", f"must be in 1 .. {MAX_CORES}, got {_show(values['cores'])}")
    if values["ram"] < MIN_RAM:
        fail("ram", f"{mib(values['ram'])} MiB is below the 64 MiB minimum")
    if values["budget"] > values["ram"]:
        fail("budget", f"{mib(values['budget'])} MiB is more than the {mib(values['ram'])} MiB "
                       f"of RAM")
    if values["budget"] + values["runtime_baseline"] > values["ram"]:
        fail("budget", f"{mib(values['budget'])} MiB plus the runtime_baseline of "
                       f"{mib(values['runtime_baseline'])} MiB exceeds the "
                       f"{mib(values['ram'])} MiB of RAM")
    return Profile(values["name"], values["ram"], values["cores"], values["budget"],
                   values["runtime_baseline"], values["serial_port"], values["arch"],
                   values.get("notes", ""), where)


# ---------------------------------------------------------------- accounting

def trainable_param_count(spec: dict, convs, n_layers: int) -> int:
    """Parameters of the last n_layers convs (program.network order) and the classifier:
    conv out*in/groups*k*k (+ out when the spec has conv_bias), linear in*out (+ out)."""
    bias = bool(spec.get("conv_bias"))
    total = sum(c.out_ch * (c.in_ch // c.groups) * prod(pair(c.kernel)) + (c.out_ch if bias else 0)
                for c in convs[-n_layers:])
    head = spec["classifier"]
    n_in, n_out = int(head["in_features"]), int(head["out_features"])
    return total + n_in * n_out + (n_out if head.get("bias", True) else 0)


def program_param_count(program, n_layers: int) -> int:
    """Parameters of the last n_layers convs of a program and of every conv and linear
    after the first of them (what trains)."""
    first = program.ops.index(program.conv_ops()[-n_layers])
    return sum(program.params[name].size for op in program.ops[first:]
               if op.kind in ("conv", "linear")
               for name in (op.attrs["weight"], op.attrs.get("bias")) if name)


@dataclass
class Fit:
    """A training step's working set against a budget (bytes)."""

    activation_bytes: int  # kept for backward, full accounting
    weight_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    optimizer: str
    budget_bytes: int
    runtime_baseline_bytes: int
    ram_bytes: int

    @classmethod
    def from_params(cls, activation_bytes: int, params: int, optimizer: str, profile: Profile,
                    budget_bytes: int | None = None) -> "Fit":
        if optimizer not in OPTIMIZER_STATE:
            raise ValueError(f"unknown optimizer {optimizer!r}: choose one of "
                             f"{', '.join(OPTIMIZER_STATE)}")
        weights = params * FLOAT_BYTES
        return cls(activation_bytes, weights, weights, OPTIMIZER_STATE[optimizer] * weights,
                   optimizer, budget_bytes or profile.budget_bytes,
                   profile.runtime_baseline_bytes, profile.ram_bytes)

    @property
    def working_bytes(self) -> int:
        return self.activation_bytes + self.weight_bytes + self.gradient_bytes + self.optimizer_bytes

    @property
    def margin_bytes(self) -> int:
        return self.budget_bytes - self.working_bytes

    @property
    def margin_percent(self) -> float:
        return 100.0 * self.margin_bytes / self.budget_bytes

    @property
    def fits(self) -> bool:
        return self.margin_bytes >= 0

    def to_json(self) -> dict:
        return {"activation_bytes": self.activation_bytes, "weight_bytes": self.weight_bytes,
                "gradient_bytes": self.gradient_bytes, "optimizer_bytes": self.optimizer_bytes,
                "optimizer": self.optimizer, "working_bytes": self.working_bytes,
                "budget_bytes": self.budget_bytes, "margin_bytes": self.margin_bytes,
                "margin_percent": round(self.margin_percent, 2), "fits": self.fits,
                "runtime_baseline_bytes": self.runtime_baseline_bytes,
                "process_bytes": self.runtime_baseline_bytes + self.working_bytes,
                "ram_bytes": self.ram_bytes}

    def lines(self) -> list:
        """The accounting as printed by `actcomp plan --profile` and `actcomp check`."""
        factor = f"{self.optimizer_bytes / self.weight_bytes:.3g}" if self.weight_bytes else "0"
        verdict = (f"fits, margin {mib(self.margin_bytes)} MiB ({self.margin_percent:.1f} %)"
                   if self.fits else
                   f"does NOT fit: {mib(-self.margin_bytes)} MiB over "
                   f"({-self.margin_percent:.1f} % of the budget)")
        rows = [("activations kept for backward (full)", self.activation_bytes),
                ("trainable weights (float32)", self.weight_bytes),
                ("gradients", self.gradient_bytes),
                (f"optimizer state ({self.optimizer}, {factor}x)", self.optimizer_bytes)]
        out = [f"{label:<40} {mib(n):>10} MiB" for label, n in rows]
        out.append(f"{'training working set':<40} {mib(self.working_bytes):>10} MiB of the "
                   f"{mib(self.budget_bytes)} MiB budget: {verdict}")
        out.append(f"{'+ runtime baseline':<40} {mib(self.runtime_baseline_bytes):>10} MiB -> "
                   f"{mib(self.runtime_baseline_bytes + self.working_bytes)} MiB of "
                   f"{mib(self.ram_bytes)} MiB RAM")
        return out
