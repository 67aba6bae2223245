"""member_loader: a MemberLoader whose StreamSpec and FeedOptions fields are given as keywords,
as the loader tests vary them one at a time."""
import dataclasses

from rat_jax.data import FeedOptions, MemberLoader, StreamSpec

SPEC_FIELDS = {f.name for f in dataclasses.fields(StreamSpec)}
FEED_FIELDS = {f.name for f in dataclasses.fields(FeedOptions)}


def split_options(kw: dict) -> dict:
    """{spec: StreamSpec, feed: FeedOptions, and the other keywords unchanged} of `kw`."""
    spec = {k: kw[k] for k in kw if k in SPEC_FIELDS}
    feed = {k: kw[k] for k in kw if k in FEED_FIELDS}
    rest = {k: v for k, v in kw.items() if k not in SPEC_FIELDS | FEED_FIELDS}
    return dict(rest, spec=StreamSpec(**spec), feed=FeedOptions(**feed))


def member_loader(dataset, train_envs, seeds, cls=MemberLoader, **kw):
    return cls(dataset, train_envs, seeds, **split_options(kw))
