"""What a run shows in the terminal: a live progress bar, or a status line every few
seconds without a terminal, and notes above it. Nothing here writes files; the
driver's recorder (``swarm.train.driver.recorder``) decides what is shown.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

GIB = 1024**3
PLAIN_LINE_INTERVAL_S = 5.0  # without a terminal, one status line at most this often


def status_text(step: dict, eval_loss: float | None) -> str:
    """``loss 0.1234  1,824 tok/s  eval 8.46  rss 0.7 GiB`` for a step's metrics."""
    parts = [f"loss {step['loss']:.4f}", f"{step['tokens_per_s']:,.0f} tok/s"]
    if eval_loss is not None:
        parts.append(f"eval {eval_loss:.4f}")
    if "peak_device_bytes" in step:
        parts.append(f"gpu {step['peak_device_bytes'] / GIB:.1f} GiB")
    parts.append(f"rss {step['peak_rss_bytes'] / GIB:.1f} GiB")
    return "  ".join(parts)


class ProgressDisplay:
    """The terminal side of a run, on stderr."""

    def __init__(self, max_steps: int):
        self.max_steps = max_steps
        self.console = Console(stderr=True)
        self._progress: Progress | None = None
        self._task = None
        self._last_plain = 0.0
        self._plain_step = -1  # the step of the last status line printed without a terminal
        self._held: str | None = None  # the last step's status line, printed by flush()

    def line(self, text: str) -> None:
        """A line that may be long (a URL, a path): printed whole, never cut."""
        self.flush()
        self.console.print(text, soft_wrap=True)

    def note(self, text: str) -> None:
        """A line above the progress bar (or on stderr without a terminal)."""
        self.flush()
        if self._progress is not None:
            self._progress.console.print(text, soft_wrap=True)
        else:
            print(text, file=sys.stderr, flush=True)

    def start(self, start_step: int) -> None:
        """Show the bar from ``start_step`` (on a terminal; else status lines follow)."""
        if not self.console.is_terminal:
            return
        self._progress = Progress(
            TextColumn("step"), MofNCompleteColumn(), BarColumn(),
            TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
            # The figures change once a step; two redraws a second keep the bar live
            # and leave the CPU to training.
            console=self.console, transient=False, refresh_per_second=2,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=self.max_steps, completed=start_step, status="loading")

    def rewind(self, step: int) -> None:
        """A restarted worker group continues from ``step``."""
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def show(self, step: int, status: str) -> None:
        """Step ``step`` is done; ``status`` is its figures (``status_text``).

        A step shown again (its eval arrived after it) redraws the bar. Without a terminal
        the last step's line waits for the next line or ``close`` so that it carries that
        eval, and a line already printed is not printed twice.
        """
        if self._progress is not None:
            self._progress.update(self._task, completed=step, status=status)
            return
        text = f"step {step}/{self.max_steps}  {status}"
        if step == self.max_steps:
            self._held = text
            return
        now = time.monotonic()
        if now - self._last_plain >= PLAIN_LINE_INTERVAL_S and step != self._plain_step:
            self._last_plain, self._plain_step = now, step
            print(text, file=sys.stderr, flush=True)

    def flush(self) -> None:
        """Print the held last-step line (without a terminal), if any."""
        if self._held is not None:
            text, self._held = self._held, None
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        self.flush()
        if self._progress is not None:
            self._progress.stop()
