"""Observation text in the DeepEyesV2 format (what the model sees inside <tool_response>)."""

from __future__ import annotations

from services.search.models import ImageResult, WebResult


def render_web(query: str, results: list[WebResult]) -> str:
    head = f"A Google search for '{query}' found {len(results)} results:\n\n## Web Results\n"
    items = []
    for i, r in enumerate(results, 1):
        lines = [f"{i}. [{r.title}]({r.link})"]
        if r.date:
            lines.append(f"Date published: {r.date}")
        if r.snippet:
            lines.append(r.snippet)
        items.append("\n".join(lines))
    return head + "\n\n".join(items)


def render_images(results: list[ImageResult]) -> str:
    head = f"A Google image search found {len(results)} results:\n\n## Image Results\n"
    items = [f"{i}. [{r.title}]({r.link})" if r.link else f"{i}. {r.title}" for i, r in enumerate(results, 1)]
    return head + "\n".join(items)


def retrieval_contents(result: WebResult) -> str:
    """Search-R1 documents are 'Title\\ntext'."""
    return f"{result.title}\n{result.snippet}"
