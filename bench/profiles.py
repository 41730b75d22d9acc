"""GPU profiles (``profiles/*.json``): datasheet peaks, an hourly price, and detection by device name."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"
_REQUIRED = ("name", "description", "device_name_patterns", "peak_bf16_tflops", "memory_bandwidth_tbs", "memory_gb",
             "spec_source", "price_per_hour_usd", "price_source", "price_date")


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    device_name_patterns: tuple[str, ...]
    peak_bf16_tflops: float
    memory_bandwidth_tbs: float
    memory_gb: float
    spec_source: str
    price_per_hour_usd: float | None  # None: no sourced price
    price_source: str
    price_date: str | None

    def matches(self, device_name: str) -> bool:
        return any(re.search(p, device_name, re.IGNORECASE) for p in self.device_name_patterns)


def load_profile(path: Path) -> Profile:
    """Read and validate one profile file."""
    try:
        raw = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"GPU profile {path} is not valid JSON: {e}") from None
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise ValueError(f"GPU profile {path} lacks {missing}; every profile needs {list(_REQUIRED)}")
    if raw["name"] != Path(path).stem:
        raise ValueError(f"GPU profile {path}: name {raw['name']!r} must match the file name {Path(path).stem!r}")
    for key in ("peak_bf16_tflops", "memory_bandwidth_tbs", "memory_gb"):
        if not isinstance(raw[key], (int, float)) or raw[key] <= 0:
            raise ValueError(f"GPU profile {path}: {key} must be a positive number, got {raw[key]!r}")
    price = raw["price_per_hour_usd"]
    if price is not None and (not isinstance(price, (int, float)) or price <= 0):
        raise ValueError(f"GPU profile {path}: price_per_hour_usd must be a positive number or null, got {price!r}")
    if price is not None and not raw["price_date"]:
        raise ValueError(f"GPU profile {path}: a price needs its price_date (or set the price to null, 'not sourced')")
    patterns = raw["device_name_patterns"]
    if not isinstance(patterns, list) or not patterns:
        raise ValueError(f"GPU profile {path}: device_name_patterns must be a non-empty list of regexes")
    for p in patterns:
        re.compile(p)
    return Profile(
        name=raw["name"], description=raw["description"], device_name_patterns=tuple(patterns),
        peak_bf16_tflops=float(raw["peak_bf16_tflops"]), memory_bandwidth_tbs=float(raw["memory_bandwidth_tbs"]),
        memory_gb=float(raw["memory_gb"]), spec_source=raw["spec_source"],
        price_per_hour_usd=None if price is None else float(price), price_source=raw["price_source"],
        price_date=raw["price_date"],
    )


def load_profiles(directory: Path = PROFILES_DIR) -> dict[str, Profile]:
    """All profiles in ``directory``, by name."""
    files = sorted(Path(directory).glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no GPU profiles (*.json) in {directory}")
    return {f.stem: load_profile(f) for f in files}


def results_folder(profile: Profile | None, device_name: str) -> str:
    """The folder name under ``profiles/results/`` for a run on ``device_name``: its profile's name, else the
    device name made a slug (``"NVIDIA GH200 480GB"`` -> ``"nvidia-gh200-480gb"``)."""
    return profile.name if profile else re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")


def detect(device_name: str, profiles: dict[str, Profile]) -> Profile | None:
    """The profile whose patterns match ``device_name``; None when none does. Ambiguity is an error."""
    hits = [p for p in profiles.values() if p.matches(device_name)]
    if len(hits) > 1:
        raise ValueError(f"device {device_name!r} matches several profiles {[p.name for p in hits]}; fix their patterns")
    return hits[0] if hits else None


@dataclass(frozen=True)
class Selection:
    """What to use for what: ``floor`` prices the FLOP/byte floor; ``measured`` labels and prices measurements."""

    requested: str
    device_name: str | None  # None: no CUDA device
    floor: list[Profile]  # profiles the floor is printed for
    measured: Profile | None  # the detected GPU's profile, None when there is none or no GPU
    message: str


def select(requested: str, device_name: str | None, profiles: dict[str, Profile]) -> Selection:
    """Resolve ``--gpu`` against the detected device; figures measured on one GPU are never labelled another's."""
    if requested != "auto" and requested not in profiles:
        raise ValueError(f"unknown GPU profile {requested!r}; choose 'auto' or one of {sorted(profiles)}")
    detected = detect(device_name, profiles) if device_name else None
    if device_name is None:
        floor = list(profiles.values()) if requested == "auto" else [profiles[requested]]
        where = "no profile detected, floors for every profile" if requested == "auto" else f"floor for profile {requested}"
        return Selection(requested, None, floor, None, f"No CUDA device: nothing is measured ({where}).")
    if requested == "auto":
        if detected is None:
            msg = (f"Detected {device_name!r}, which matches no profile in profiles/: measured figures are labelled with "
                   "the device name, no peak or price is applied.")
            return Selection(requested, device_name, [], None, msg)
        return Selection(requested, device_name, [detected], detected, f"Detected {device_name!r}: profile {detected.name}.")
    chosen = profiles[requested]
    if detected is chosen:
        return Selection(requested, device_name, [chosen], chosen, f"Detected {device_name!r}: profile {chosen.name}.")
    other = f"profile {detected.name}" if detected else "no profile"
    beside = f" (printed beside {detected.name}'s)" if detected else ""
    msg = (f"You asked for --gpu {requested}, but this GPU is {device_name!r} ({other}). Measured figures are this "
           f"GPU's, labelled and priced as {detected.name if detected else 'the device name, unpriced'}, never as "
           f"{requested}'s; the {requested} profile is used only for its FLOP/byte floor{beside}.")
    return Selection(requested, device_name, [chosen, *([detected] if detected else [])], detected, msg)


def default_out(tiny: bool, measure: bool, device) -> Path:
    """Where a bench's results go without ``--out``: ``results/cpu-smoke`` for tiny stand-ins, ``results/counts``
    for meta-device counts, ``results/cpu`` for a CPU measurement, the GPU's own folder on CUDA."""
    if tiny:
        return PROFILES_DIR / "results" / "cpu-smoke"
    if not measure:
        return PROFILES_DIR / "results" / "counts"
    if device.type != "cuda":
        return PROFILES_DIR / "results" / "cpu"
    import torch

    name = torch.cuda.get_device_name(device)
    return PROFILES_DIR / "results" / results_folder(select("auto", name, load_profiles()).measured, name)
