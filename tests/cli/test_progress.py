"""Export progress: every stage starts at 0 and ends at its total, counted in named units."""

from __future__ import annotations

import io

from minicpmo.cli.progress import ProgressPrinter


def test_export_reports_each_stage_from_zero_with_units(tiny_checkpoint, tmp_path):
    from minicpmo.export.bundle import export_bundle
    from minicpmo.export.options import ExportOptions

    events = []
    export_bundle(tiny_checkpoint, tmp_path / "b", ExportOptions(audio=False),
                  progress=lambda stage, done, total, unit="": events.append((stage, done, total, unit)))
    stages = list(dict.fromkeys(e[0] for e in events))
    assert stages == ["vision", "decoder", "embeddings", "speech", "hashing"]
    for stage in stages:
        seen = [e for e in events if e[0] == stage]
        assert seen[0][1] == 0 and seen[-1][1] == seen[-1][2], seen  # from 0 to the total
        assert [e[1] for e in seen] == sorted(e[1] for e in seen)
    decoder = [e for e in events if e[0] == "decoder"]
    assert decoder[0][3] == "layers" and [e[1] for e in decoder] == list(range(decoder[0][2] + 1))
    hashing = [e for e in events if e[0] == "hashing"]
    assert hashing[0][3] == "files" and len(hashing) == hashing[0][2] + 1


def test_printer_lines():
    out = io.StringIO()
    printer = ProgressPrinter(out)
    printer("vision", 0, 1)
    printer("vision", 1, 1)
    printer("decoder", 3, 28, "layers")
    lines = [line.split("] ", 1)[1] for line in out.getvalue().splitlines()]
    assert lines == ["vision: running", "vision: done", "decoder: 3/28 layers"]
