"""Content checks that ship with mailpool: asyncio coroutine functions for mailpool.plugins."""
