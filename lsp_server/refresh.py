"""`livekv/refresh`: a completion the server could not answer for real is asked again, by the
client, once the server can answer it.

Under maxPromptMs (how long a completion may spend bringing the cache up to date) a completion
asked while the model loads and the file's first encode is still to do, or after an edit too big
to encode in time, comes back empty (Answer.incomplete: the LSP reply is an empty list). The
client shows nothing, and asks again only at the next keystroke: a person who typed once and
waits sees nothing at all. So the server remembers the document (a miss), and once the worker is
ready for it (an idle job, LspSession.job_idle, has found nothing of it left to encode, which
also means the model is loaded) it sends the notification `livekv/refresh` {"uri": uri}; the
client asks again if the person is still there with nothing shown.

One notification per document with a miss pending: misses before it share it, and a later
completion for the document that is answered for real (or its didClose) settles it with none.
Abandoned completions (None, or RequestCancelled: the client's $/cancelRequest, a newer request
for the same document, an edit of it) are not misses: the client that moved on asks again itself.
And a request that waits while the model loads is not one either: it is queued behind the load
and answered when it runs.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

log = logging.getLogger("livekv.lsp")

REFRESH = "livekv/refresh"


class Refreshes:
    """The documents with a miss pending. Event loop only (the idle job hands over which documents
    it left encoded, in its result), so nothing here needs a lock."""

    def __init__(self, notify: Callable[[str, Any], None]):
        self.notify = notify  # (method, params): the server's protocol.notify
        self.missed: set[str] = set()
        self.sent = 0  # for livekv/stats

    def answered(self, uri: str, incomplete: bool) -> None:
        """A completion for uri was answered: a miss when it was cut short (nothing to show yet),
        else the client has what it asked for and owes nothing."""
        if incomplete:
            self.missed.add(uri)
        else:
            self.missed.discard(uri)

    def forget(self, uri: str) -> None:
        """uri was closed: nobody is waiting in it."""
        self.missed.discard(uri)

    def ready(self, uris: Iterable[str]) -> None:
        """An idle job left each of uris with nothing to encode (and so the model is loaded): ask
        again for those with a miss, once each (a completion answered meanwhile settled its own)."""
        for uri in uris:
            if uri not in self.missed:
                continue
            self.missed.discard(uri)
            self.sent += 1
            log.info("%s: the completion answered empty can be answered now; asking the client again", uri)
            self.notify(REFRESH, {"uri": uri})

    def stats(self) -> dict:
        return dict(pending=sorted(self.missed), sent=self.sent)
