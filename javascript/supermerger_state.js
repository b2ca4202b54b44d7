// SuperMerger's indicator beside the web UI's checkpoint selector: while a merge is swapped into the
// loaded model (which the selector cannot show: it still names the checkpoint file), it names the merge
// and its history ID and offers Restore. A1111 and Forge load every javascript/*.js of an extension.
// The state comes from GET /supermerger/v1/state (mergers/api.py), polled while the page is visible.
(function () {
    "use strict";

    const ROUTE = "/supermerger/v1";
    const POLL_MS = 2000;
    const IDLE_POLL_MS = 15000; // the route is missing or refused (e.g. behind --api-auth): ask rarely
    // Requests carry no credentials: a 401 behind --api-auth must not pop up the browser's login box.
    const ANCHORS = ["#setting_sd_model_checkpoint", "#supermerger_checkpoint"]; // A1111's quicksettings; tests
    const ID = "supermerger_state";

    function root() {
        return typeof gradioApp === "function" ? gradioApp() : document;
    }

    function anchor() {
        for (const selector of ANCHORS) {
            const found = root().querySelector(selector);
            if (found) return found;
        }
        return null;
    }

    // The indicator element, made once and placed right after the checkpoint selector.
    function indicator() {
        let box = root().querySelector("#" + ID);
        if (box) return box;
        const place = anchor();
        if (!place) return null;
        box = document.createElement("div");
        box.id = ID;
        box.style.cssText = "display:none; align-self:center; margin:0 8px; padding:2px 8px; border-radius:6px;"
            + "background:#f59e0b33; border:1px solid #f59e0b; font-size:0.9em; white-space:nowrap;";
        const text = document.createElement("span");
        text.className = "supermerger-state-text";
        const button = document.createElement("button");
        button.type = "button";
        button.className = "supermerger-state-restore";
        button.textContent = "Restore";
        button.style.cssText = "margin-left:6px; padding:0 6px; border:1px solid currentColor; border-radius:4px;";
        button.addEventListener("click", restore);
        box.append(text, button);
        place.insertAdjacentElement("afterend", box);
        return box;
    }

    function describe(state) {
        const id = state.history_id === null || state.history_id === undefined ? "" : ` (ID ${state.history_id})`;
        const warned = state.warnings && state.warnings.length ? ` ⚠ ${state.warnings.length}` : "";
        return `SuperMerger: ${state.name || "a merge"}${id} is swapped in${warned}`;
    }

    function show(state) {
        const box = indicator();
        if (!box) return;
        box.dataset.merged = state.merged ? "true" : "false";
        if (!state.merged) {
            box.style.display = "none";
            return;
        }
        box.querySelector(".supermerger-state-text").textContent = describe(state);
        const recipe = state.recipe ? JSON.stringify(state.recipe) : "";
        box.title = [`into ${state.checkpoint || "the loaded model"}`, recipe, ...(state.warnings || [])]
            .filter(Boolean).join("\n");
        box.style.display = "inline-flex";
    }

    let timer = null;

    async function refresh() {
        clearTimeout(timer);
        let wait = POLL_MS;
        try {
            const response = await fetch(ROUTE + "/state", {credentials: "omit", cache: "no-store"});
            if (response.ok) show(await response.json());
            else wait = IDLE_POLL_MS;
        } catch (error) {
            wait = IDLE_POLL_MS; // the server is restarting, or unreachable
        }
        timer = setTimeout(refresh, document.hidden ? IDLE_POLL_MS : wait);
    }

    async function restore() {
        const box = indicator();
        const text = box && box.querySelector(".supermerger-state-text");
        try {
            const response = await fetch(ROUTE + "/restore", {method: "POST", credentials: "omit"});
            const body = await response.json();
            if (!response.ok && text) text.textContent = `SuperMerger: restore failed: ${body.detail}`;
        } catch (error) {
            if (text) text.textContent = `SuperMerger: restore failed: ${error}`;
        }
        refresh();
    }

    function start() {
        refresh();
        document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
    }

    if (typeof onUiLoaded === "function") onUiLoaded(start);
    else if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
    else start();
})();
