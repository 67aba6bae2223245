"""The domain objects the stages pass around (issue 26, item 2): a member's settings with its
bookkeeping (`MemberSpec`) and one auxiliary dataset's runs in the auxiliary pool (`AuxRuns`).

Both have a flat JSON form (`to_dict`) for what goes to disk or into a fingerprint: the same
dicts the stages wrote before they were typed, so fingerprints and files do not change.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

__all__ = ["AuxRuns", "MemberSpec", "BOOKKEEPING"]

BOOKKEEPING = ("init", "h", "group")  # MemberSpec's fields beside the hparams, in a flat dict


@dataclasses.dataclass(frozen=True)
class MemberSpec:
    """One member of a members run: `hparams` (lr, weight_decay, resnet_dropout, seed, optional
    lp_steps and any other keys, which go into its records) and its bookkeeping: `init` (where
    its params come from: "foundation", "lp:textures", "aux:textures/run0", "fusing:..."),
    `group` (noaux / aux / fusing in a target run) and `h` (its hparams seed, DomainBed's
    hparams_seed; None: its position in the run)."""
    hparams: Mapping[str, Any]
    init: str | None = None
    group: str | None = None
    h: int | None = None

    @classmethod
    def of(cls, member: "MemberSpec | Mapping[str, Any]") -> "MemberSpec":
        """`member` as a MemberSpec: a flat dict (what `member_hparams` returns, with optional
        init / group / h keys) is translated once here."""
        if isinstance(member, MemberSpec):
            return member
        flat = dict(member)
        fields = {k: flat.pop(k) for k in BOOKKEEPING if k in flat}
        return cls(flat, **fields)

    @property
    def seed(self) -> int:
        return int(self.hparams["seed"])

    @property
    def lp_steps(self) -> int:
        return self.hparams.get("lp_steps", -1)

    def record_hparams(self) -> dict:
        """The "hparams" of its records and soup cards: the hparams and its hparams seed."""
        return dict(self.hparams) if self.h is None else dict(self.hparams, h=self.h)

    def to_dict(self) -> dict:
        """The flat form: hparams plus the bookkeeping fields that are set."""
        extra = {k: getattr(self, k) for k in BOOKKEEPING if getattr(self, k) is not None}
        return dict(self.hparams, **extra)

    def replace(self, **changes) -> "MemberSpec":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass
class AuxRuns:
    """One auxiliary dataset of the auxiliary pool: the featurizer of each run (run r at
    `featurizers[r]`), the pool's fingerprint (what the target runs depend on) and the manifest,
    one JSON-able dict per run (dataset, identity, run, foundation, ...)."""
    featurizers: list
    fingerprint: str = ""
    manifest: list[dict] = dataclasses.field(default_factory=list)

    @property
    def n_runs(self) -> int:
        return len(self.featurizers)
