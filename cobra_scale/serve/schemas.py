"""The HTTP contract of the recommendation service: request/response models and limits.

Pure pydantic (no Ray, no torch): the request model is built from the server's
:class:`Limits`, so the OpenAPI schema states the real bounds (``k <= max_k``,
``len(items) <= max_history``, ...). Validation is strict: ``"10"`` is not an integer,
``true`` is not a number, NaN/Infinity and unknown fields are rejected, so every bad
input ends as a 4xx with a message before any model code runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Annotated, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

MODES = ("cobra", "no_fusion", "dense_only", "sparse_only")  # = retrieve.recommender.MODES (kept torch-free here)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MODEL_NAME_PATTERN = r"^[A-Za-z0-9_.\-]{1,64}$"
ItemId = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]


@dataclass(frozen=True)
class Limits:
    """Bounds every request is checked against (set by the app config, shown in OpenAPI)."""

    max_k: int = 200  # items per response
    max_history: int = 50  # history items a request may send (the model's window by default)
    max_beams: int = 256  # M, beams a request may ask for
    max_body_bytes: int = 65536  # larger bodies get 413 before parsing
    max_temperature: float = 1000.0  # upper bound of tau and psi

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value <= 0:
                raise ValueError(f"limit {name} must be > 0, got {value}")


def request_model(limits: Limits) -> type[BaseModel]:
    """The ``POST /recommend`` body model for these limits."""
    class RecommendRequest(BaseModel):
        """A user's recent items (oldest first) or a user id whose history the server looks up."""

        model_config = ConfigDict(strict=True, extra="forbid", title="RecommendRequest")

        items: Optional[list[ItemId]] = Field(
            None, min_length=1, max_length=limits.max_history,
            description=f"item ids the user interacted with, oldest first (1..{limits.max_history}); or give user_id",
        )
        user_id: Optional[int] = Field(None, ge=INT64_MIN, le=INT64_MAX, description="look the history up in the server's history table")
        k: int = Field(10, ge=1, le=limits.max_k, description="items to return")
        mode: Optional[Literal[MODES]] = Field(None, description="inference mode (default: the model's)")  # type: ignore[valid-type]
        beams: Optional[int] = Field(None, ge=1, le=limits.max_beams, description="M, sparse IDs decoded per user")
        tau: Optional[float] = Field(None, gt=0, le=limits.max_temperature, allow_inf_nan=False, description="BeamFusion temperature on beam scores")
        psi: Optional[float] = Field(None, gt=0, le=limits.max_temperature, allow_inf_nan=False, description="BeamFusion temperature on cosine similarity")
        exclude_history: Optional[bool] = Field(None, description="do not recommend the history's own items")
        model: Optional[str] = Field(None, pattern=MODEL_NAME_PATTERN, description="named model version to ask (default: the server's default)")

        @model_validator(mode="after")
        def _one_history_source(self):
            if (self.items is None) == (self.user_id is None):
                raise ValueError("give exactly one of 'items' (recent item ids) or 'user_id'")
            return self

    return RecommendRequest


class RecommendedItem(BaseModel):
    item_id: int = Field(description="catalogue item id")
    score: float = Field(description="BeamFusion score (cobra), cosine (no_fusion / dense_only) or beam log-probability (sparse_only)")
    sid: list[int] = Field(description="the item's sparse semantic ID, one code per level")


class RecommendResponse(BaseModel):
    items: list[RecommendedItem] = Field(description="best first; fewer than k when the beams hold fewer candidates")
    model: str = Field(description="the named model slot that answered")
    model_version: str = Field(description="the version label of the weights that answered")
    mode: str
    k: int
    beams: int
    tau: float
    psi: float
    prior_weight: float = Field(0.0, description="weight of the transition prior mixed into BeamFusion (0: the paper's COBRA)")
    free_query_weight: float = Field(0.0, description="weight of the model's ID-free dense vector in each beam's query (0: the paper's COBRA)")
    free_mix_weight: float = Field(0.0, description="weight of the model's ID-free ranking mixed into BeamFusion (0: the paper's COBRA)")
    history_length: int = Field(description="history items the model read")
    # Set by the A/B ingress (cobra_scale.ab.serving); absent when the server runs no experiment.
    experiment: Optional[str] = Field(None, description="A/B: the experiment that chose the model (null: the user is in none)")
    arm: Optional[str] = Field(None, description="A/B: the user's arm ('default' outside experiments, 'holdout' in the global holdout)")


class ErrorResponse(BaseModel):
    detail: str = Field(description="what was wrong, in one line")
    errors: Optional[list[dict]] = Field(None, description="per-field validation errors (422)")


def first_error_line(errors: list[dict]) -> str:
    """A pydantic/FastAPI error list as one line: ``body.k: Input should be ... (+2 more)``."""
    if not errors:
        return "invalid request"
    e = errors[0]
    loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
    msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{loc}: {msg}{more}"


__all__ = ["ErrorResponse", "Limits", "MODES", "RecommendResponse", "RecommendedItem", "first_error_line", "request_model"]
