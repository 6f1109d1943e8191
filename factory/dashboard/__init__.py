"""The operator's power dashboard: a static page (HTML, vanilla JS, hand-drawn SVG charts).

`static/` holds the page every replica serves at `/dashboard`; it reads `/dashboard/api/state`
once (with the last 15 minutes of history) and then `/dashboard/api/stream`, a server-sent
event stream read with `fetch` so the admin key can travel in the `Authorization` header.
Nothing is fetched from outside the server. `sample_state.json` is an example state document
for tests and for working on the page without a running engine.
"""
