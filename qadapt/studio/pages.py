"""The studio's pages: each is one module with its API routes (ROUTES) and its script (SCRIPT, in
static/). A new page is a module and a line here."""

from __future__ import annotations

from qadapt.studio import chat_page, eval_page, export_page, new_run_page, runs_page

PAGES = (runs_page, new_run_page, eval_page, chat_page, export_page)
# A pattern ending in a group that takes the rest of the path (a run's page, /api/runs/NAME) is tried after
# the others, so that /api/runs/NAME/sets finds its own route whichever page declares it.
ROUTES = sorted((route for page in PAGES for route in page.ROUTES), key=lambda route: route.pattern.endswith(".+)"))
SCRIPTS = [page.SCRIPT for page in PAGES]
