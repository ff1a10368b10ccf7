"""wandb: one run per stage, grouped by the pipeline run; offline without credentials.

wandb must never stop a training run: without credentials it logs offline (and says how to
sync later), and a start-up failure degrades to offline, then to off, with a warning; a
failure while logging turns it off for the rest of the stage.
"""

from __future__ import annotations

import netrc
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

from rlhf.tracking.backend import RunInfo

# The host wandb stores its API key under in ~/.netrc after `wandb login`.
_WANDB_NETRC_HOSTS = ("api.wandb.ai",)


def _version_at_least(version: str, minimum: str) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version) >= Version(minimum)
    except InvalidVersion:
        return True


def wandb_has_credentials() -> bool:
    """True if wandb could authenticate: an API key in the environment or a netrc entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    candidates = [os.environ.get("NETRC"), str(Path.home() / ".netrc"), str(Path.home() / "_netrc")]
    base_url = os.environ.get("WANDB_BASE_URL", "")
    hosts = list(_WANDB_NETRC_HOSTS)
    if base_url:
        hosts.append(base_url.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0])
    for path in candidates:
        if not path or not os.path.isfile(path):
            continue
        try:
            parsed = netrc.netrc(path)
        except (netrc.NetrcParseError, OSError):
            continue
        for host in hosts:
            auth = parsed.authenticators(host)
            if auth and auth[2]:
                return True
    return False


class WandbTracker:
    """Attributes: ``run`` (None once wandb is off) and ``sync_dir`` (the directory to pass
    to ``wandb sync`` after an offline run, else None)."""

    def __init__(self, info: RunInfo) -> None:
        try:
            import wandb
        except ImportError as err:
            raise ImportError(
                "report_to includes 'wandb' but the 'wandb' package is not installed; "
                "install it with: pip install 'rlhf[wandb]'"
            ) from err
        self.wandb = wandb
        self.stage = info.stage
        self.run: Any = None
        self.sync_dir: Path | None = None
        self._start(info)

    def _start(self, info: RunInfo) -> None:
        """Start a wandb run; never raises, never waits long for a network that is not there."""
        wandb = self.wandb
        mode = os.environ.get("WANDB_MODE", "").strip().lower() or None
        if mode in ("disabled", "dryrun"):
            mode = "disabled" if mode == "disabled" else "offline"
        if mode not in ("offline", "disabled") and not wandb_has_credentials():
            mode = "offline"
        wandb_dir = os.environ.get("WANDB_DIR") or str(info.run_dir)
        Path(wandb_dir).mkdir(parents=True, exist_ok=True)
        kwargs = dict(
            project=os.environ.get("WANDB_PROJECT", "rlhf"),
            group=info.group,
            name=info.stage,
            job_type=info.stage,
            config=info.config,
            dir=wandb_dir,
            # Each stage is its own run even if an earlier stage's run was left open;
            # "create_new" exists from wandb 0.19.10, older releases spell it True.
            reinit="create_new" if _version_at_least(getattr(wandb, "__version__", "0"), "0.19.10") else True,
        )
        # Try the requested mode, then offline, then give up on wandb: the local files
        # still hold everything, so a tracker outage must not cost a training run.
        attempts = [mode] if mode in ("offline", "disabled") else [mode, "offline"]
        for attempt in attempts:
            try:
                settings = wandb.Settings(init_timeout=30, silent=attempt == "offline")
                self.run = wandb.init(mode=attempt, settings=settings, **kwargs)
                break
            except Exception as err:  # wandb raises many types (CommError, UsageError, timeouts)
                warnings.warn(
                    f"wandb: could not start the {self.stage!r} run in {attempt or 'online'} mode "
                    f"({type(err).__name__}: {err}); "
                    + ("retrying offline" if attempt != "offline" else "wandb logging is off for this stage"),
                    RuntimeWarning,
                    stacklevel=4,
                )
                self.run = None
        if self.run is None:
            return
        try:
            # An explicit x-axis keeps curves right even if a resumed stage logs a step that
            # wandb's own monotonic step counter would drop.
            self.run.define_metric("trainer/step")
            self.run.define_metric("*", step_metric="trainer/step")
        except Exception as err:
            warnings.warn(f"wandb: define_metric failed ({err}); using wandb's own step", RuntimeWarning, stacklevel=4)
        run_dir_attr = getattr(self.run, "dir", None)
        offline = attempt == "offline" or getattr(self.run, "offline", False) is True
        if offline and attempt != "disabled" and run_dir_attr:
            # run.dir is ".../wandb/offline-run-<time>-<id>/files"; `wandb sync` wants its parent.
            self.sync_dir = Path(run_dir_attr).parent
            print(
                f"wandb: logging offline (no credentials or no network); upload later with: "
                f"wandb sync {self.sync_dir}",
                file=sys.stderr,
            )

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self.run is not None:
            self._call(self.run.log, {**metrics, "trainer/step": int(step)})

    def log_samples(self, key: str, columns: Sequence[str], records: list[dict[str, Any]], step: int) -> None:
        if self.run is not None:
            rows = [[record.get(column) for column in columns] for record in records]
            table = self.wandb.Table(columns=list(columns), data=rows)
            self._call(self.run.log, {key: table, "trainer/step": int(step)})

    def finish(self) -> None:
        if self.run is not None:
            self._call(self.run.finish)
            self.run = None

    def _call(self, fn: Any, *args: Any) -> None:
        # wandb talks to a background service; if that dies mid-run, warn once and stop using it.
        try:
            fn(*args)
        except Exception as err:
            warnings.warn(
                f"wandb: {getattr(fn, '__name__', 'call')} failed ({type(err).__name__}: {err}); "
                "wandb logging is off for the rest of this stage, local files continue",
                RuntimeWarning,
                stacklevel=4,
            )
            self.run = None
