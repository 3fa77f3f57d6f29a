"""Observation text in the DeepEyesV2 format (what the model sees inside <tool_response>)."""

from __future__ import annotations

from services.search.models import ImageResult, WebResult

# The exact strings of DeepEyesV2's search tool (evaluation/inference_demo), quirks included: a date
# line and the snippet each start with a newline of their own, and video players' text is removed.
_VIDEO_NOISE = "Your browser can't play this video."


def render_web(query: str, results: list[WebResult]) -> str:
    items = []
    for i, r in enumerate(results, 1):
        date = f"\nDate published: {r.date}" if r.date is not None else ""
        snippet = f"\n{r.snippet}" if r.snippet is not None else ""
        items.append(f"{i}. [{r.title}]({r.link}){date}\n{snippet}".replace(_VIDEO_NOISE, ""))
    return f"A Google search for '{query}' found {len(items)} results:\n\n## Web Results\n" + "\n\n".join(items)


def render_images(results: list[ImageResult]) -> str:
    """One `<image>` placeholder per result; the images themselves travel beside the text."""
    items = [f"{i}. <image>\n[{r.title}] \n".replace(_VIDEO_NOISE, "") for i, r in enumerate(results, 1)]
    return f"A Google image search for the image found {len(items)} results:\n\n## Web Results\n" + "\n\n".join(items)


def retrieval_contents(result: WebResult) -> str:
    """Search-R1 documents are 'Title\\ntext'."""
    return f"{result.title}\n{result.snippet}"
