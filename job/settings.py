"""One declaration per setting, and the one set of checks every command's flags go through.

Why: docs/architecture.md#settings
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

from job.errors import UsageError

ENV_PREFIX = "GAN_JOB_"
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off", "")

# Upper bounds, shared where two commands size the same thing.
MAX_SEED = 2**32 - 1  # torch takes seeds below 2**64; seed + epoch and seed + rank must stay there
MAX_BATCH = 65_536  # images per step; bench makes four batches up front (65536 x 784 bytes x 4 = 205 MB)
MAX_NOISE_DIM = 4096  # G's first layer is noise_dim x 12544 weights: 205 MB at this size
MAX_EPOCHS = 100_000  # far beyond any schedule; a typo like 5000000 fails at once
MAX_STEPS = 100_000  # bench's timed steps (minutes on a CPU at the default batch); --checkpoint-every-steps
MAX_WARMUP = 10_000  # bench's untimed steps
MAX_WORKERS = 1024  # Ray Train workers (DDP ranks); also the cap of --cpus-per-worker and --threads
MAX_LIMIT = 100_000_000  # training images kept (the datasets hold 60,000)
MAX_EVAL_IMAGES = 100_000  # generated images per evaluation: images and features held in memory (~0.5 GB)
MAX_GENERATE_IMAGES = 1_000_000  # generate's .npy alone is 3 GB at this count
MAX_SECONDS = 86_400  # waits and intervals: a day
MAX_MARGIN = 100.0  # promote's margin: 100 = up to 100 times worse, which already promotes anything
MAX_CLASSES = 1000  # class indices a flag may name (ImageNet's count); a model's own count is checked once it is loaded


@dataclass(frozen=True)
class Setting:
    """What one flag (and its environment variable, for train) may hold, and its help."""

    help: str  # the --help text; the default is appended where it is not None
    kind: type = str  # int, float, str, or bool (a switch)
    low: float | None = None  # smallest value allowed (inclusive unless low_open)
    high: float | None = None  # largest value allowed (inclusive unless high_open); every number has one
    low_open: bool = False  # the value must be above `low` (a learning rate of 0 learns nothing)
    high_open: bool = False  # the value must be below `high` (a decay of 1 never moves)
    choices: tuple[str, ...] = ()  # the only values a str setting may take; () = any
    env: bool = True  # train only: whether GAN_JOB_<NAME> may stand in for the flag
    metavar: str | None = None  # how --help shows the value
    reads: Callable[[str], object] | None = None  # a parser for a value that is not one number (--num-workers MIN-MAX)

    @property
    def numeric(self) -> bool:
        return self.kind in (int, float)

    def range_text(self) -> str:
        """The allowed values in words: `an integer in [1, 100000]`, `a finite number in (0, 1]`."""
        noun = "an integer" if self.kind is int else "a finite number"
        opening, closing = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"{noun} in {opening}{_show(self.low)}, {_show(self.high)}{closing}"

    def problem(self, value: object) -> str | None:
        """Why `value` is not allowed (one phrase, to follow the flag's name), or None when it is."""
        if self.choices:
            return (
                None
                if value in self.choices
                else f"{value!r} is not one of: {', '.join(self.choices)}; choose one of them"
            )
        if self.kind is bool:
            return None if isinstance(value, bool) else f"must be true or false, got {value!r}; use true or false"
        if not self.numeric:
            return None
        wrong_kind = (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (self.kind is int and not isinstance(value, int))
        )
        if wrong_kind or (
            isinstance(value, float) and not math.isfinite(value)
        ):  # an int is always finite, and may not fit a float
            return self.wanted(value)
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        return self.wanted(value) if too_low or too_high else None

    def wanted(self, got: object) -> str:
        """The message for a value outside the declaration: what is allowed, what came, the fix."""
        # a pasted 400-digit number stays readable
        shown = repr(got) if len(repr(got)) <= 40 else repr(got)[:20] + "..." + repr(got)[-8:]
        return f"must be {self.range_text()}, got {shown}; use a value in that range"

    def check(self, flag: str, value: object) -> None:
        """Refuse a value that is not allowed, naming `flag`."""
        reason = self.problem(value)
        if reason is not None:
            raise UsageError(f"{flag} {reason}")

    def parse(self, text: str) -> object:
        """A command-line or environment string as this setting's value; ValueError says why not."""
        if self.reads is not None:
            return self.reads(text)
        if self.kind is bool:
            word = text.strip().lower()
            if word not in TRUE_WORDS + FALSE_WORDS:
                raise ValueError(f"{text!r} is not a boolean; use true or false")
            return word in TRUE_WORDS
        if self.kind is int:
            try:
                value: object = int(text.strip())
            except ValueError:
                raise ValueError(self.wanted(text)) from None
        elif self.kind is float:
            try:
                value = float(text.strip())
            except ValueError:
                raise ValueError(self.wanted(text)) from None
        else:
            value = text
        reason = self.problem(value)
        if reason is not None:
            raise ValueError(reason)
        return value


def _show(bound: float | None) -> str:
    if bound is None:
        return "..."
    return str(int(bound)) if float(bound).is_integer() and abs(bound) < 1e15 else repr(bound)


class ArgType:
    """argparse's `type=` for a Setting: parses and checks; argparse prefixes the flag to the message."""

    def __init__(self, setting: Setting) -> None:
        self.setting = setting
        self.__name__ = setting.kind.__name__  # argparse names the type in some of its own messages

    def __call__(self, text: str) -> object:
        try:
            return self.setting.parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None


def setting(default: object = None, *, factory: Callable[[], object] | None = None, **spec: object) -> object:
    """A dataclass field declared as a Setting: `epochs: int = setting(50, kind=int, low=1, high=..., help=...)`."""
    metadata = {"setting": Setting(**spec)}  # type: ignore[arg-type]
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def declared(cls: type) -> dict[str, Setting]:
    """The Settings of a dataclass's fields, by field name, in declaration order."""
    return {f.name: f.metadata["setting"] for f in dataclasses.fields(cls) if "setting" in f.metadata}


def env_var_for(name: str) -> str:
    """The environment variable of a train setting: `num_workers` → `GAN_JOB_NUM_WORKERS`."""
    return ENV_PREFIX + name.upper()


def add_flag(
    parser: argparse.ArgumentParser, flag: str, spec: Setting, default: object = None, **kwargs: object
) -> argparse.Action:
    """Add `flag` as `spec` declares it: parsed and checked by the Setting, help with the bounds or choices."""
    help_ = spec.help.replace("%", "%%")  # argparse formats help with %
    if spec.numeric:
        help_ += f"; {spec.range_text()}"
    if default is not None and spec.kind is not bool:
        help_ += f" (default {default})"
    if spec.kind is bool:
        action = parser.add_argument(flag, action="store_true", default=default, help=help_, **kwargs)
    else:
        metavar = spec.metavar or ("{" + ",".join(spec.choices) + "}" if spec.choices else None)
        action = parser.add_argument(flag, type=ArgType(spec), default=default, metavar=metavar, help=help_, **kwargs)
    action.setting = spec  # type: ignore[attr-defined]  # for the tests that walk every flag
    return action


# The flags several commands share, declared once.
SEED = Setting("seed of the noise", kind=int, low=0, high=MAX_SEED)
# At least gan.metrics.MIN_IMAGES (k-NN needs k + 1 images; tests/test_evaluate.py checks the two agree).
EVAL_NUM = Setting(
    "generated images per evaluation (at least 4, for k-NN with k = 3)", kind=int, low=4, high=MAX_EVAL_IMAGES
)
DATASET_NAMES = ("mnist", "fashion-mnist", "cifar10")
RESOLUTIONS = (28, 32, 64, 128)  # the square sizes the networks are built for (gan.models.SUPPORTED_RESOLUTIONS)
CHANNELS = (1, 3)
DATA_LOADINGS = ("auto", "memory", "stream")  # --data-loading (job.runtime.streaming)


def data_text(text: str) -> str:
    """`--data`: a dataset's name, or a local path or s3://bucket/prefix (checked where it is read)."""
    text = text.strip()
    if not text:
        raise ValueError(
            "is empty; pass a dataset's name (mnist, fashion-mnist, cifar10), a folder, ZIP or s3:// prefix"
        )
    if "://" in text and not text.startswith("s3://"):
        raise ValueError(f"{text!r}: only local paths and s3://BUCKET/PREFIX are supported")
    return text


def one_of(allowed: tuple[int, ...]) -> Callable[[str], int]:
    """A reader of an integer that must be one of `allowed` (--resolution, --channels)."""

    def read(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            value = None
        if value not in allowed:
            raise ValueError(f"{text!r} is not one of {', '.join(map(str, allowed))}; choose one of them")
        return value

    return read


DATA = Setting(
    "a dataset's name (mnist, fashion-mnist, cifar10), or a folder, ZIP, CIFAR-10 tarball or s3://bucket/prefix of "
    "images",
    metavar="NAME|PATH|s3://bucket/prefix",
    reads=data_text,
)
PRECISIONS = ("auto", "fp32", "bf16")
CUDA_GRAPHS_MODES = ("auto", "on", "off")  # gan.stepper.graphs_wanted says what each means


def endpoint_problem(url: str) -> str | None:
    """Why `url` is not an S3 endpoint, as a phrase to follow its flag's name; None when it is http(s)://HOST[:PORT].
    Credentials in it are refused without echoing them: they would be stored with every run's configuration."""
    parsed = urlsplit(url)
    if "@" in parsed.netloc:
        return (
            "carries credentials in its URL; give the endpoint as http(s)://HOST:PORT and the keys in "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    try:
        parsed.port  # noqa: B018 (raises ValueError on a port that is not a number)
    except ValueError:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.hostname:
        return f"{url!r} is not an http(s) URL; write it as http://HOST:PORT"
    return None


def check_endpoint_url(url: str, where: str = "--s3-endpoint") -> None:
    """Refuse an S3 endpoint that `endpoint_problem` finds wrong, naming `where` it came from."""
    problem = endpoint_problem(url)
    if problem is not None:
        raise UsageError(f"{where} {problem}")


def read_endpoint_url(text: str) -> str:
    """`--s3-endpoint` from a command line or a variable: checked as it is read."""
    problem = endpoint_problem(text)
    if problem is not None:
        raise ValueError(problem)
    return text


S3_ENDPOINT = Setting(
    "S3 endpoint URL, e.g. http://minio:9000 (default: AWS_ENDPOINT_URL)", metavar="URL", reads=read_endpoint_url
)
