"""What every config section shares: strict models, the error type, the contract marker."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A user-facing configuration problem; the message is one line."""


CONTRACT = {"contract": True}  # json_schema_extra of the keys that are a stable public contract




class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
