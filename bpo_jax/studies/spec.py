"""A study file: a base run config, arms over dotted config keys, seeds, a baseline and claims.

    name: sweet_spot_scaling
    base: configs/studies/sort_base.yaml     # a run config (paths relative to the working directory)
    set: {train.max_steps: 64}               # optional: overrides for every arm
    run_dir: runs/studies/sweet_spot_scaling
    shared_dir: runs/studies/shared          # optional (default run_dir/shared): studies with the same
                                             # base, set and largest n can share SFT and samples
    grid:                                    # arms = the product of these values ...
      pairs.strategy: [max/min, max/mu-2s]
      sample.n: [8, 64]
    arms:                                    # ... times these named arms (either part optional)
      - {name: one pair per prompt, set: {bpo.pairs_per_prompt: 1}}
    seeds: [0, 1, 2]                         # replicates: each sets every key of seed_keys
    seed_keys: [train.seed, pairs.seed, bpo.seed]
    baseline: {pairs.strategy: max/min}      # an arm's baseline: the arm matching this selector
                                             # that agrees with it on every other key
    arms_mode: auto                          # optional: vmap | map | auto (bpo_jax.stacking)
    claims:                                  # each: an estimate with a CI and a verdict
      - claim: max/mu-2s beats max/min at n = 64
        better: {pairs.strategy: max/mu-2s, sample.n: 64}   # a selector, or a list of them
        worse: {pairs.strategy: max/min, sample.n: 64}
      - claim: ...
        contrast: [[1, {...}], [-1, {...}], ...]           # any weighted sum of arm means

A selector is a mapping of dotted keys (or `arm: NAME`) to values; the arms it matches are
averaged with equal weight. Everything is checked when the file is read: errors name the file,
the key and, for claims, the claim.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from bpo_jax.config import ConfigError

DEFAULT_SEED_KEYS = ("train.seed", "pairs.seed", "bpo.seed")
_TOP_KEYS = {"name", "description", "base", "set", "run_dir", "shared_dir", "grid", "arms", "seeds", "seed_keys",
             "baseline", "claims", "bootstrap", "max_arms_per_program", "arms_mode"}


class StudyError(ConfigError):
    """A problem with a study file; the message names the file and the key."""


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    settings: dict[str, Any]  # dotted key -> value: what makes this arm differ from the base


@dataclasses.dataclass(frozen=True)
class Claim:
    claim: str
    terms: tuple[tuple[float, tuple[str, ...]], ...]  # (weight, names of the arms averaged under it)
    paper: str = ""


@dataclasses.dataclass(frozen=True)
class Study:
    path: Path
    name: str
    description: str
    base: Path
    overrides: tuple[str, ...]  # `key=value` items applied to the base before each arm's settings
    run_dir: Path
    shared_dir: Path
    arms: tuple[Arm, ...]
    seeds: tuple[int, ...]
    seed_keys: tuple[str, ...]
    baselines: dict[str, str | None]  # arm name -> its baseline arm's name
    claims: tuple[Claim, ...]
    bootstrap: int = 2000
    max_arms_per_program: int = 64
    arms_mode: str = "auto"  # how one program runs over arms: auto | vmap | map (bpo_jax.stacking)

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)

    def run_overrides(self, arm: Arm, seed: int) -> list[str]:
        """The `key=value` overrides that turn the base config into this arm's run with this seed."""
        items = list(self.overrides) + [f"{k}={json.dumps(v)}" for k, v in arm.settings.items()]
        return items + [f"{k}={seed}" for k in self.seed_keys]


def run_stem(arm: str, seed: int) -> str:
    """The file name (without suffix) of an (arm, seed)'s results: arm names may hold any character."""
    return hashlib.sha256(f"{arm}~s{seed}".encode()).hexdigest()[:16]


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _arm_name(settings: Mapping[str, Any]) -> str:
    return " ".join(f"{_short(k)}={v}" for k, v in settings.items())


def matches(arm: Arm, selector: Mapping[str, Any]) -> bool:
    """Whether `arm` has every key = value of the selector (`arm: NAME` matches by name)."""
    for key, value in selector.items():
        if key == "arm":
            if arm.name != value:
                return False
        elif key not in arm.settings or arm.settings[key] != value:
            return False
    return True


def _fail(where: Path, key: str, problem: str) -> StudyError:
    return StudyError(key, problem, str(where))


def _expand_arms(raw: Mapping[str, Any], where: Path) -> tuple[Arm, ...]:
    grid = raw.get("grid") or {}
    named = raw.get("arms") or [{}]
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise _fail(where, "grid", "must map dotted config keys to non-empty lists of values")
    if not isinstance(named, list) or not all(isinstance(a, dict) for a in named):
        raise _fail(where, "arms", "must be a list of {name, set} mappings")
    arms = []
    for values in itertools.product(*grid.values()):
        cell = dict(zip(grid, values))
        for extra in named:
            unknown = set(extra) - {"name", "set"}
            if unknown:
                raise _fail(where, "arms", f"unknown field {sorted(unknown)[0]!r} (expected name, set)")
            settings = {**cell, **(extra.get("set") or {})}
            name = " ".join(part for part in (_arm_name(cell), str(extra.get("name") or "")) if part) or "base"
            if extra and not extra.get("name"):
                raise _fail(where, "arms", "every named arm needs a name")
            arms.append(Arm(name, settings))
    names = [a.name for a in arms]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise _fail(where, "arms", f"two arms are both called {repeated[0]!r}")
    return tuple(arms)


def _selected(arms: Sequence[Arm], selector: Any, where: Path, key: str) -> tuple[str, ...]:
    selectors = selector if isinstance(selector, list) else [selector]
    names: list[str] = []
    for s in selectors:
        if not isinstance(s, dict) or not s:
            raise _fail(where, key, f"a selector must be a non-empty mapping of keys to values, got {s!r}")
        hits = [a.name for a in arms if matches(a, s)]
        if not hits:
            raise _fail(where, key, f"selector {s} matches no arm")
        names += [h for h in hits if h not in names]
    return tuple(names)


def _claims(raw: Any, arms: Sequence[Arm], where: Path) -> tuple[Claim, ...]:
    if not isinstance(raw, list):
        raise _fail(where, "claims", "must be a list")
    claims = []
    for i, c in enumerate(raw):
        key = f"claims[{i}]"
        if not isinstance(c, dict) or not isinstance(c.get("claim"), str):
            raise _fail(where, key, "each claim needs a `claim:` sentence")
        if ("contrast" in c) == ("better" in c or "worse" in c):
            raise _fail(where, key, f"{c['claim']!r}: give either better + worse, or contrast")
        if "contrast" in c:
            terms = []
            for term in c["contrast"]:
                if not (isinstance(term, list) and len(term) == 2 and isinstance(term[0], (int, float))):
                    raise _fail(where, key, f"{c['claim']!r}: a contrast term is [weight, selector], got {term!r}")
                terms.append((float(term[0]), _selected(arms, term[1], where, key)))
            if abs(sum(w for w, _ in terms)) > 1e-9:
                raise _fail(where, key, f"{c['claim']!r}: contrast weights must sum to 0")
        else:
            if "better" not in c or "worse" not in c:
                raise _fail(where, key, f"{c['claim']!r}: needs both better and worse")
            terms = [(1.0, _selected(arms, c["better"], where, key)), (-1.0, _selected(arms, c["worse"], where, key))]
        claims.append(Claim(c["claim"], tuple(terms), str(c.get("paper", ""))))
    return tuple(claims)


def _baselines(selector: Any, arms: Sequence[Arm], where: Path) -> dict[str, str | None]:
    """Each arm's baseline: the arm matching `selector` that agrees with it on all other keys."""
    if selector is None:
        return {a.name: None for a in arms}
    if not isinstance(selector, dict) or not selector:
        raise _fail(where, "baseline", "must be a selector: a mapping of keys (or arm: NAME) to values")
    candidates = [a for a in arms if matches(a, selector)]
    if not candidates:
        raise _fail(where, "baseline", f"{selector} matches no arm")
    out: dict[str, str | None] = {}
    for arm in arms:
        free = set(selector) | {"arm"}
        same = [c for c in candidates
                if all(c.settings.get(k) == v for k, v in arm.settings.items() if k not in free)
                and all(arm.settings.get(k) == v for k, v in c.settings.items() if k not in free)]
        out[arm.name] = same[0].name if len(same) == 1 else (candidates[0].name if len(candidates) == 1 else None)
    return out


def load_study(path: str | Path, overrides: Sequence[str] = ()) -> Study:
    """Read and check a study file; `overrides` (`key=value`) apply to every arm (its own settings win)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise StudyError(None, f"cannot read study file ({e.strerror})", str(path)) from None
    except yaml.YAMLError as e:
        raise StudyError(None, f"invalid YAML: {e}", str(path)) from None
    if not isinstance(raw, dict):
        raise StudyError(None, "a study file is a mapping (name, base, grid/arms, seeds, ...)", str(path))
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise _fail(path, unknown[0], f"unknown study key; expected one of {', '.join(sorted(_TOP_KEYS))}")
    for key in ("name", "base", "run_dir"):
        if not isinstance(raw.get(key), str):
            raise _fail(path, key, "is required (a string)")
    if not Path(raw["base"]).is_file():
        raise _fail(path, "base", f"run config not found: {raw['base']}")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise _fail(path, "seeds", f"must be a list of distinct non-negative integers, got {seeds!r}")
    seed_keys = raw.get("seed_keys", list(DEFAULT_SEED_KEYS))
    if not isinstance(seed_keys, list) or not all(isinstance(k, str) for k in seed_keys):
        raise _fail(path, "seed_keys", "must be a list of dotted config keys")
    common = raw.get("set") or {}
    if not isinstance(common, dict):
        raise _fail(path, "set", "must map dotted config keys to values")
    arms = _expand_arms(raw, path)
    varied = {k for a in arms for k in a.settings}
    clash = sorted(varied & set(seed_keys))
    if clash:
        raise _fail(path, clash[0], "is set per replicate by seeds/seed_keys; it cannot also vary across arms")
    bootstrap = raw.get("bootstrap", 2000)
    max_arms = raw.get("max_arms_per_program", 64)
    for key, value in (("bootstrap", bootstrap), ("max_arms_per_program", max_arms)):
        if not isinstance(value, int) or value < 1:
            raise _fail(path, key, f"must be a positive integer, got {value!r}")
    from bpo_jax.stacking import MODES  # imports JAX: only after every check that does not need it

    arms_mode = raw.get("arms_mode", "auto")
    if arms_mode not in MODES:
        raise _fail(path, "arms_mode", f"must be one of {', '.join(MODES)}, got {arms_mode!r}")
    return Study(
        path=path,
        name=raw["name"],
        description=str(raw.get("description", "")).strip(),
        base=Path(raw["base"]),
        overrides=tuple(f"{k}={json.dumps(v)}" for k, v in common.items()) + tuple(overrides),
        run_dir=Path(raw["run_dir"]),
        shared_dir=Path(raw.get("shared_dir") or Path(raw["run_dir"]) / "shared"),
        arms=arms,
        seeds=tuple(seeds),
        seed_keys=tuple(seed_keys),
        baselines=_baselines(raw.get("baseline"), arms, path),
        claims=_claims(raw.get("claims") or [], arms, path),
        bootstrap=bootstrap,
        max_arms_per_program=max_arms,
        arms_mode=arms_mode,
    )
