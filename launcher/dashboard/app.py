"""The dashboard's web side: the routes, and the rules every request passes.

Served by waitress on 127.0.0.1 only. Every request needs the token `serve` prints (then a cookie
carries it); a request whose Host is not a loopback name is refused, so a DNS-rebinding page
cannot reach us by another name. A GET never changes anything: the actions are POSTs that must
come from our own page (Origin equal to our address, and the CSRF token the page holds). Every
response forbids inline scripts and anything from another origin (Content-Security-Policy), and
Jinja escapes everything a template shows: text from a host stays text.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import secrets
import sys
import webbrowser
from pathlib import Path
from urllib.parse import urlencode

from flask import Flask, abort, g, jsonify, redirect, render_template, request, send_file

from gpu_run.config import Config, load_config
from gpu_run.dashboard import views
from gpu_run.dashboard.actions import KINDS, Actions, Busy
from gpu_run.errors import GpuRunError, RunNotFound
from gpu_run.host_text import safe
from gpu_run.ledger import Ledger
from gpu_run.paths import ledger_path

DEFAULT_PORT = 8765
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
SERVER_THREADS = 8  # page loads and polls; the actions run in threads of their own
# Scripts and styles from our own files only. plotly.js adds its rules (the mode bar's, the
# legend's) through the CSSOM into a <style> element it creates empty: the one inline style
# allowed is the empty one (the hash below is sha256 of ""), so no text a page holds can style it.
# (Its bundled map library's own inline <style> is refused and logged: the charts use no maps.)
EMPTY_STYLE_HASH = "'sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU='"
CSP = (f"default-src 'none'; script-src 'self'; style-src 'self' {EMPTY_STYLE_HASH}; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
PACKAGE_DIR = Path(__file__).resolve().parent


def plotly_js() -> Path | None:
    """plotly.js as the installed plotly package ships it, found without importing plotly."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "package_data" / "plotly.min.js"
    return path if path.is_file() else None


def csrf_token(token: str) -> str:
    """The token the page sends back with each POST, derived from the access token."""
    return hmac.new(token.encode(), b"gpu-run dashboard csrf", hashlib.sha256).hexdigest()


def cookie_name() -> str:
    """One cookie per port the browser uses: cookies ignore ports, and two dashboards (or an SSH
    tunnel's local port) must not overwrite each other's token."""
    port = request.host.rpartition(":")[2]
    return f"gpu_run_dashboard_{port if port.isdigit() else 'default'}"


def loopback_host() -> bool:
    name = request.host.lower()
    if not name.startswith("["):
        name = name.rpartition(":")[0] if ":" in name else name
    elif "]:" in name:
        name = name.rpartition(":")[0]
    return name in LOOPBACK_NAMES


def wants_json() -> bool:
    return request.path.startswith("/api/") or request.method == "POST"


def refuse(status: int, message: str):
    if wants_json():
        return jsonify({"error": message}), status
    return render_template("error.html", status=status, message=message, banner=[], csrf=""), status


def create_app(token: str, actions: Actions | None = None) -> Flask:
    """The dashboard for the ledger at $GPU_RUN_HOME, answering only requests that hold `token`."""
    app = Flask("gpu_run.dashboard", root_path=str(PACKAGE_DIR), static_folder="static", template_folder="templates")
    # Static files are revalidated on each load (a 304 on loopback costs nothing), so an upgraded
    # gpu-run never runs yesterday's page script.
    app.config["SEND_FILE_MAX_AGE_DEFAULT"] = 0
    app.json.sort_keys = False
    app.jinja_env.trim_blocks = app.jinja_env.lstrip_blocks = True  # no template whitespace in a 1,000-row page
    app.url_map.merge_slashes = False  # "files//etc/passwd" is refused as it is, not redirected
    actions = actions or Actions()
    csrf = csrf_token(token)

    def token_ok(given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(given.encode(), token.encode())

    @app.before_request
    def check_request():
        if not loopback_host():
            return refuse(403, "this dashboard answers only on 127.0.0.1 / localhost")
        from_query = token_ok(request.args.get("token"))
        if not (from_query or token_ok(request.cookies.get(cookie_name()))):
            return refuse(403, "no valid token: open the address that `gpu-run dashboard` printed "
                               "(http://127.0.0.1:PORT/?token=...)")
        if request.method not in ("GET", "HEAD"):
            origin = request.headers.get("Origin")
            if origin != f"http://{request.host}":
                return refuse(403, f"refused: a change must come from the dashboard's own page (Origin {origin!r})")
            if not hmac.compare_digest(request.headers.get("X-CSRF-Token", "").encode(), csrf.encode()):
                return refuse(403, "refused: the request lacks the page's CSRF token; reload the page")
        g.set_cookie = from_query
        if from_query and request.method == "GET" and not request.path.startswith(("/api/", "/static/", "/vendor/")):
            # The token leaves the address bar (and the history) once the cookie holds it.
            rest = [(k, v) for k, v in request.args.items(multi=True) if k != "token"]
            path = "/" + request.path.lstrip("/")  # never "//host": that would lead off this machine
            return redirect(path + ("?" + urlencode(rest) if rest else ""), code=303)
        return None

    @app.after_request
    def add_headers(response):
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        if not request.path.startswith(("/static/", "/vendor/")):
            response.headers["Cache-Control"] = "no-store"
        if g.get("set_cookie"):
            response.set_cookie(cookie_name(), token, httponly=True, samesite="Strict", path="/")
        return response

    @app.teardown_request
    def close_ledger(_exc):
        ledger = g.pop("ledger", None)
        if ledger is not None:
            ledger.close()

    def ledger() -> Ledger:
        if "ledger" not in g:
            g.ledger = Ledger(ledger_path())  # one connection per request: SQLite's belong to a thread
        return g.ledger

    def config() -> Config:
        return load_config()  # gpu-run.toml from the folder the dashboard started in, as every command reads it

    def page(template: str, **context):
        return render_template(template, banner=views.not_stopped(ledger()), csrf=csrf, **context)

    @app.errorhandler(RunNotFound)
    def run_not_found(e):
        return refuse(404, str(e))

    @app.errorhandler(GpuRunError)
    def our_error(e):
        return refuse(400, str(e))

    # Pages ---------------------------------------------------------------------------------------

    @app.get("/")
    def runs_page():
        host, status = request.args.get("host") or None, request.args.get("status") or None
        show_all = request.args.get("all") == "1"
        number = request.args.get("page", "1")
        table = views.runs_table(ledger(), config(), host=host, status=status,
                                 page=int(number) if number.isdigit() else 1,
                                 per_page=None if show_all else views.RUNS_PER_PAGE)
        filters = {key: value for key, value in (("host", host), ("status", status)) if value}
        return page("runs.html", table=table, host=host, status=status, filters=filters, nav="runs")

    @app.get("/runs/<run_id>")
    def run_page(run_id: str):
        return page("run.html", run=views.run_page(ledger(), config(), run_id), nav="runs")

    @app.get("/compare")
    def compare_page():
        picked = [r.strip() for value in request.args.getlist("runs") for r in value.split(",") if r.strip()]
        result = views.compare(ledger(), picked[:20]) if picked else {"rows": [], "problems": []}
        choices = views.compare_choices(ledger(), config())
        return page("compare.html", picked=picked, result=result, choices=choices, nav="compare")

    @app.get("/costs")
    def costs_page():
        return page("costs.html", costs=views.costs(ledger(), config()), nav="costs")

    # Files ---------------------------------------------------------------------------------------

    @app.get("/runs/<run_id>/files/<path:relative>")
    def run_file(run_id: str, relative: str):
        run = ledger().get_run(run_id)
        path = views.file_in_run(run.run_dir, relative)
        if path is None:
            return refuse(403, "refused: not a regular file inside the run's folder")
        figure = path.suffix.lower() in views.FIGURE_SUFFIXES
        mimetype = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}.get(path.suffix.lower())
        # Anything but a figure is a download, never rendered here: a host's .html or .svg stays a file.
        return send_file(path, mimetype=mimetype if figure else "application/octet-stream", as_attachment=not figure,
                         download_name=safe(path.name) or "file", max_age=0)

    @app.get("/favicon.ico")
    def favicon():
        return "", 204  # no icon, and no 404 in the browser's console for its asking

    @app.get("/vendor/plotly.min.js")
    def plotly():
        path = plotly_js()
        if path is None:
            abort(404)
        return send_file(path, mimetype="text/javascript", max_age=0)

    # What the pages poll, and the actions --------------------------------------------------------

    @app.get("/api/runs/<run_id>")
    def run_live(run_id: str):
        return jsonify(views.run_live(ledger(), config(), run_id))

    @app.get("/api/not-stopped")
    def not_stopped():
        return jsonify(views.not_stopped(ledger()))

    @app.get("/api/actions/<action_id>")
    def action_state(action_id: str):
        action = actions.get(action_id)
        if action is None:
            return refuse(404, "no such action")
        return jsonify(action.as_dict())

    @app.post("/runs/<run_id>/<kind>")
    def start_action(run_id: str, kind: str):
        if kind not in KINDS:
            return refuse(404, f"no action {kind!r}; the actions are {', '.join(KINDS)}")
        run = ledger().get_run(run_id)
        try:
            action = actions.start(kind, run.run_id)
        except Busy as e:
            return refuse(409, str(e))
        return jsonify(action.as_dict()), 202

    return app


def serve(port: int = DEFAULT_PORT, open_browser: bool = False) -> None:
    """Serve the dashboard on 127.0.0.1:port until Ctrl-C; port 0 takes any free port."""
    from waitress.server import create_server

    Ledger(ledger_path()).close()  # a broken ledger or GPU_RUN_HOME is one line now, not a page later
    token = secrets.token_urlsafe(32)
    actions = Actions()
    app = create_app(token, actions)
    try:
        server = create_server(app, host="127.0.0.1", port=port, threads=SERVER_THREADS, ident="gpu-run",
                               expose_tracebacks=False)
    except OSError as e:
        raise GpuRunError(f"cannot listen on 127.0.0.1:{port} ({e.strerror}); another dashboard may hold it: "
                          f"pass --port N") from None
    url = f"http://127.0.0.1:{server.effective_port}/?token={token}"
    print(f"gpu-run dashboard on {url}", flush=True)
    print("It only shows your runs; it stops or pulls one only when you confirm it on the page. Ctrl-C ends it.",
          flush=True)
    if open_browser:
        webbrowser.open(url)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    running = actions.running()
    if running:
        names = ", ".join(f"{a.kind} of {a.run_id}" for a in running)
        print(f"waiting for {names} to finish (Ctrl-C again leaves it: `gpu-run stop RUN` finishes it later)",
              file=sys.stderr, flush=True)
        try:
            actions.wait()
        except KeyboardInterrupt:
            pass
    print("dashboard stopped", flush=True)
