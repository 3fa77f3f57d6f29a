"""Request and response models of the search proxy.

The wire field `backend` names the search *provider* (offline, serpapi, brave); it keeps that name because
clients and exported cache snapshots use it."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

TopK = Annotated[int, Field(ge=1)]
# No pattern constraint: pydantic's regex engine refuses a lone surrogate outright, where the proxy
# replaces it and says so; blank and over-long queries get 400 at the route (the limit is a setting).
Query = Annotated[str, Field(description="the search query: not blank, at most max_query_chars")]


class WebResult(BaseModel):
    title: str
    link: str
    snippet: str = ""
    date: str | None = None


class ImageResult(BaseModel):
    title: str
    link: str | None = None
    image: str | None = Field(None, description="base64 image bytes, when the provider has them")
    thumbnail_url: str | None = None


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: Query
    top_k: TopK = 5
    backend: str | None = Field(None, description="must name the proxy's provider when given")


class SearchResponse(BaseModel):
    query: str
    backend: str
    cached: bool
    results: list[WebResult]
    rendered: str = Field(description="the observation text DeepEyesV2 puts in <tool_response>")
    notes: list[str] = Field(default_factory=list, description="what the proxy changed in the request, and why")


class ImageSearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str | None = Field(None, description="base64 image bytes")
    key: str | None = Field(None, description="dataset key of cached results (MMSearch-R1 cache)")
    top_k: TopK = 5
    backend: str | None = Field(None, description="must name the proxy's provider when given")


class ImageSearchResponse(BaseModel):
    backend: str
    cached: bool
    results: list[ImageResult]
    rendered: str


class RetrieveRequest(BaseModel):
    """Search-R1's retriever request (verl search tool)."""

    queries: list[Query] = Field(min_length=1)
    topk: TopK = 3
    return_scores: bool = False


class RetrieveResponse(BaseModel):
    result: list[list[dict[str, Any]]]
    notes: list[str] = Field(default_factory=list, description="what the proxy changed in the request, and why")
