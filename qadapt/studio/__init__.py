"""`qadapt studio`: a local web page over the run directories under one folder.

    qadapt studio [--runs DIR] [--host 127.0.0.1] [--port N]

Built on qadapt's own modules, over a small JSON API: the page draws what the run directories hold
(metrics.jsonl as it grows, status.json, summary.json, scores) and starts `qadapt` processes of their own
for what changes them (train, resume), so that closing the page stops nothing.

    web.py        requests, routes, and the errors a request gets (a 4xx with a message, never a traceback)
    server.py     the HTTP server: loopback by default, a token for any other host, the static page
    pages.py      the registry: each page is one module with its ROUTES and its script
    runs_page.py  runs, their states and live metrics, the report table, stop and resume
    new_run_page.py  recipes, the form's schema, validation, the memory plan, start
    processes.py  the qadapt processes the studio starts, detached, and their console logs
    static/       the page: plain HTML, CSS and JavaScript, no build step and nothing fetched from elsewhere
"""
