"""`gpu-run dashboard`: one local web page for every run, its live curves, its cost, and any machine
still billing.

app.py is the web side (routes, the token, the CSRF and Content-Security-Policy rules), views.py
reads what a page shows from the ledger and the run folders, actions.py runs the buttons' commands
in background threads. The page's JavaScript and CSS are in static/, the chart library (plotly.js)
is served from the installed plotly package: nothing comes from the internet.
"""
