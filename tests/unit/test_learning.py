"""Learning's scoring rule without a database."""

from __future__ import annotations

import msgspec
import pytest

from aiwfe.plugins.learning.contract import ExpertScores, ExpertScoresResult, Feedback
from aiwfe.plugins.learning.plugin import bayes


def test_bayesian_average_shrinks_toward_the_prior() -> None:
    assert bayes(0.6, 5, 0.0, 0.0) == 0.6
    one_great = bayes(0.6, 5, 1.0, 1.0)
    many_great = bayes(0.6, 5, 50.0, 50.0)
    assert 0.6 < one_great < many_great < 1.0
    assert bayes(0.6, 5, 0.0, 50.0) < bayes(0.6, 5, 0.0, 1.0) < 0.6
    assert bayes(0.6, 5, 0.5, 0.5) == pytest.approx((0.6 * 5 + 0.5) / 5.5, abs=1e-4)


def test_contracts() -> None:
    f = msgspec.msgpack.decode(msgspec.msgpack.encode(Feedback(job="j", expert="e", rating=4)), type=Feedback)
    assert (f.comment, f.expertise, f.rater) == ("", [], "")
    assert ExpertScores(experts=["a"]).expertise == []
    assert ExpertScoresResult(scores={"a": 0.5}).detail == {}
