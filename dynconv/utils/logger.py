"""Run logs: TensorBoard scalars (tensorboardX) and the same numbers as JSON lines for scripts to read back."""
import json


class RunLogger:
    """Writes scalars to TensorBoard and one JSON object per call to a .jsonl file. Inactive off rank 0."""

    def __init__(self, tb_dir=None, jsonl_path=None, active=True):
        self.writer = None
        self.tb_dir = tb_dir if active else None
        self.jsonl_path = jsonl_path if active else None

    def _tensorboard(self):
        """The event file, opened at the first scalar: a resumed run that logs nothing adds no empty file."""
        if self.writer is None and self.tb_dir:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(self.tb_dir)
        return self.writer

    def log(self, step, scalars, kind):
        """`scalars`: name -> number or list of numbers (a list is logged as name/0, name/1, ...)."""
        if self._tensorboard() is not None:
            for name, value in scalars.items():
                if isinstance(value, (list, tuple)):
                    for i, v in enumerate(value):
                        self.writer.add_scalar(f"{kind}/{name}/{i}", v, step)
                else:
                    self.writer.add_scalar(f"{kind}/{name}", value, step)
            self.writer.flush()
        if self.jsonl_path:
            with open(self.jsonl_path, "a") as f:
                f.write(json.dumps({"kind": kind, "step": step, **scalars}) + "\n")

    def close(self):
        if self.writer is not None:
            self.writer.close()


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
