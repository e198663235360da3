"""The Batch API's control plane through the official ``openai`` client: files and batches, nothing else.

Every call is small and bounded (a 60 s timeout, the SDK's own two retries for connection errors and 5xx): a
crash-safe run does not need clever retries here, because any step interrupted is simply done again on the next
run from what the state file says.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import openai

from .rules import ENDPOINT, ProviderRules

log = logging.getLogger(__name__)

LIST_PAGES = 20  # at most 2,000 batches scanned to find one by ds_name (the provider keeps 30 days)


class BatchBackend:
    """upload → create → retrieve/list/cancel → download → delete, for one endpoint and key."""

    def __init__(self, base_url: str, api_key: str, rules: ProviderRules, *, timeout_s: float = 60.0) -> None:
        self.rules = rules
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=2)

    async def close(self) -> None:
        await self.client.close()

    async def upload(self, path: Path, filename: str) -> str:
        """Upload under ``filename`` (unique per shard), so an upload whose id was never recorded can be found."""
        handle = await asyncio.to_thread(open, path, "rb")
        try:
            return (await self.client.files.create(file=(filename, handle), purpose="batch")).id
        finally:
            handle.close()

    async def find_file(self, filename: str, size: int) -> str | None:
        """The id of a file uploaded under ``filename`` with ``size`` bytes (uploaded just before a crash), or None.

        Servers without a file list (404/405) get None: the shard is uploaded again."""
        try:
            page = await self.client.files.list(purpose="batch")
            async for item in page:
                if item.filename == filename and item.bytes == size:
                    return item.id
        except (openai.NotFoundError, openai.UnprocessableEntityError):
            return None
        except openai.APIStatusError as exc:
            if exc.status_code == 405:
                return None
            raise
        return None

    async def create(self, file_id: str, window: str, metadata: dict[str, str]) -> Any:
        return await self.client.batches.create(input_file_id=file_id, endpoint=ENDPOINT,  # type: ignore[arg-type]
                                                completion_window=window, metadata=metadata)  # type: ignore[arg-type]

    async def retrieve(self, batch_id: str) -> Any:
        return await self.client.batches.retrieve(batch_id)

    async def cancel(self, batch_id: str) -> Any:
        return await self.client.batches.cancel(batch_id)

    async def find(self, ds_name: str) -> Any | None:
        """The batch tagged ``ds_name`` (created before a crash and not yet recorded), or None.

        DashScope filters on the server (``ds_name``); OpenAI has no such filter, so its list is scanned.
        """
        extra = {"ds_name": ds_name} if self.rules.list_filter else None
        after: str | None = None
        for _ in range(LIST_PAGES):
            kwargs: dict[str, Any] = {"limit": 100, "extra_query": extra}
            if after:
                kwargs["after"] = after
            try:
                page = await self.client.batches.list(**kwargs)
            except openai.NotFoundError:  # a server without a batch list: nothing can be found, create
                log.warning("%s has no batch list: a batch created just before a crash cannot be found", ds_name)
                return None
            for batch in page.data:
                if (batch.metadata or {}).get("ds_name") == ds_name:
                    return batch
            if not page.has_more or not page.data:
                return None
            after = page.data[-1].id
        return None

    async def download(self, file_id: str, target: Path) -> None:
        """The file's content to ``target`` (written whole, then renamed: a torn download is never read)."""
        content = await self.client.files.content(file_id)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(content.read())
        tmp.replace(target)

    async def delete(self, file_id: str) -> None:
        """Delete a file; one already gone is fine (a re-run after a crash deletes again)."""
        try:
            await self.client.files.delete(file_id)
        except openai.NotFoundError:
            pass
