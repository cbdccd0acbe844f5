"""The progress of `flux train`: a tqdm bar with rate and ETA on a terminal, plain lines elsewhere."""

import io
import json

from flux.integrations.tools.progress import Progress


def row(step: int) -> dict:
    return {"step": step, "reward_mean": 0.5, "staleness_mean": 0.1, "async_ratio": 0.3, "lag_mean": 0.5,
            "samples_per_s": 12.0, "wall_s": float(step)}


class Tty(io.StringIO):
    def isatty(self):
        return True


def feed(tmp_path, stream, steps=25) -> Progress:
    p = Progress(str(tmp_path), steps, stream)
    with (tmp_path / "metrics.jsonl").open("w") as f:
        for s in range(steps):
            f.write(json.dumps(row(s)) + "\n")
            f.flush()
            if s == 12:
                p.poll()
                p.say("flux: gen0: cannot reach the SGLang server; engine restarted")
    p.poll()
    p.close()
    return p


def test_a_terminal_gets_a_bar_with_rate_eta_and_the_steps_numbers(tmp_path):
    out = Tty()
    p = feed(tmp_path, out)
    text = out.getvalue()
    assert "25/25" in text and ("step/s" in text or "s/step" in text)  # tqdm's rate
    assert "<" in text and "reward 0.500" in text and "staleness 0.100" in text  # elapsed<remaining, numbers
    assert "flux: gen0: cannot reach the SGLang server; engine restarted\n" in text  # above the bar, whole
    assert len(p.rows) == 25


def test_elsewhere_plain_lines_every_ten_steps_and_the_last(tmp_path):
    out = io.StringIO()
    feed(tmp_path, out)
    lines = out.getvalue().splitlines()
    assert [ln.split()[1] for ln in lines if ln.startswith("step ")] == ["1/25", "11/25", "21/25", "25/25"]
    assert "\r" not in out.getvalue() and "\033" not in out.getvalue()
    assert "flux: gen0: cannot reach the SGLang server; engine restarted" in lines
