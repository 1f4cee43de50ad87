"""Assertions shared by the apps' end-to-end tests and the trainers' resume tests."""
from __future__ import annotations

from pathlib import Path
from collections.abc import Callable


def assert_clean_failure(main: Callable[[list[str]], int], capsys, argv: list[str], out: Path,
                         fragment: str) -> None:
    """``main(argv)`` exits 2 with one stderr line containing ``fragment`` and leaves nothing under ``out``
    (not even the staging directory ``.<out.name>-*``)."""
    assert main(argv + ["--output", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}-")]


def assert_resumes_exactly(make, steps_before: int, steps_after: int, round_trip) -> dict:
    """A trainer from ``make()`` trained ``steps_before`` steps, checkpointed through ``round_trip(state_dict)``
    and trained ``steps_after`` more equals a fresh trainer loaded from that checkpoint and trained as many:
    the same losses and bit-identical weights. Returns the checkpoint."""
    import torch

    a = make()
    a.train(steps_before)
    state = round_trip(a.state_dict())
    a.train(steps_after)
    b = make()
    b.load_state_dict(state)
    b.train(steps_after)
    assert b.history == a.history
    for pa, pb in zip(a.net.parameters(), b.net.parameters()):
        assert torch.equal(pa, pb)
    return state
