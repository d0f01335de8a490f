"""Hub settings: CivitAI base URL and token, download folder and install style (``layout``: a1111, comfyui, flat or auto).

Precedence: explicit argument (CLI option) > environment > config file > default. The config file
is TOML at ``$CKPTLAB_CONFIG`` or ``<user config dir>/ckptlab/config.toml``::

    [civitai]
    base_url = "https://civitai.com"
    token = "..."            # CIVITAI_API_TOKEN wins over this

    [download]
    dir = "~/stable-diffusion-webui"
    layout = "a1111"         # a1111 | comfyui | flat | auto
    max_concurrent = 2

The token is only ever placed in an ``Authorization`` header for the CivitAI origin; ``repr`` of
the config hides it so it cannot end up in logs or JSON output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ckptlab.errors import BadChoiceError, ConfigError

DEFAULT_CIVITAI_URL = "https://civitai.com"
MAX_CONCURRENT_CAP = 4


def config_path() -> Path:
    env = os.environ.get("CKPTLAB_CONFIG")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir("ckptlab")) / "config.toml"


def read_config_file(path: Path | None = None) -> dict:
    path = path or config_path()
    if not path.is_file():
        return {}
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: no stdlib TOML reader
        return {}
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read config: {e}", path) from None


@dataclass
class HubConfig:
    civitai_base_url: str = DEFAULT_CIVITAI_URL
    civitai_token: str | None = field(default=None, repr=False)
    download_dir: Path | None = None
    layout: str = "auto"
    max_concurrent: int = 2

    @property
    def civitai_api(self) -> str:
        return self.civitai_base_url.rstrip("/") + "/api/v1"

    def to_dict(self) -> dict:  # for --json: never the token itself
        return {"civitai_base_url": self.civitai_base_url, "civitai_token_set": bool(self.civitai_token),
                "download_dir": self.download_dir, "layout": self.layout, "max_concurrent": self.max_concurrent}


def load_hub_config(*, base_url: str | None = None, token: str | None = None, download_dir: str | Path | None = None,
                    layout: str | None = None, max_concurrent: int | None = None) -> HubConfig:
    data = read_config_file()
    civ = data.get("civitai", {}) if isinstance(data.get("civitai"), dict) else {}
    dl = data.get("download", {}) if isinstance(data.get("download"), dict) else {}
    cfg = HubConfig()
    cfg.civitai_base_url = (base_url or os.environ.get("CKPTLAB_CIVITAI_URL") or civ.get("base_url")
                            or DEFAULT_CIVITAI_URL).rstrip("/")
    if not cfg.civitai_base_url.startswith(("http://", "https://")):
        raise ConfigError(f"CivitAI base URL must start with http:// or https:// (got {cfg.civitai_base_url!r})")
    cfg.civitai_token = token or os.environ.get("CIVITAI_API_TOKEN") or civ.get("token") or None
    d = download_dir or os.environ.get("CKPTLAB_DOWNLOAD_DIR") or dl.get("dir")
    cfg.download_dir = Path(d).expanduser() if d else None
    cfg.layout = (layout or dl.get("layout") or "auto").lower()
    if cfg.layout not in ("auto", "a1111", "comfyui", "flat"):
        msg = f"unknown layout {cfg.layout!r} (use auto, a1111, comfyui or flat)"
        if layout:  # the --layout option: a usage error; the config file's value: a config error
            raise BadChoiceError(f"--layout {layout!r}: {msg}")
        raise ConfigError(msg)
    n = max_concurrent if max_concurrent is not None else dl.get("max_concurrent", 2)
    try:
        n = int(n)
    except (TypeError, ValueError):
        raise ConfigError(f"max_concurrent must be an integer (got {n!r})") from None
    cfg.max_concurrent = max(1, min(n, MAX_CONCURRENT_CAP))
    return cfg
