// The SuperMerger tab's page behaviour, in A1111, Forge and the standalone app (Gradio 3.41 and 4):
// - hover hints: each control's `title` from window.supermergerHints (javascript/supermerger_hints.js);
// - Ctrl+Enter (Cmd+Enter) in the tab runs Merge and Gen where it is shown, else Merge;
// - copy buttons beside the weight boxes and the History tab's recipe;
// - hovering a weights box shows the block sliders' values in the readable form (BASE:0.5, IN00:1, …).
// Everything happens inside #supermerger_tabs, so other tabs are left alone. Gradio builds the page after
// this script runs (and rebuilds parts of it), so the work is redone, once a frame at most, on DOM changes.
(function () {
    "use strict";

    const ROOT_ID = "supermerger_tabs";
    const LABEL = 'span[data-testid="block-info"]'; // a component's label, in Gradio 3.41 and 4
    const COPYABLE = ["weights for alpha", "weights for beta", "Recipe (JSON)"]; // labels of boxes to copy from
    const WEIGHT_BOXES = ["weights for alpha", "weights for beta"];
    const RUN_BUTTONS = ["#supermerger_merge_and_gen", "#supermerger_merge"]; // the first one shown wins
    const SLIDER_COLUMNS = '[id^="supermerger_sliders_"]';

    function root() {
        const app = typeof gradioApp === "function" ? gradioApp() : document;
        return app.querySelector("#" + ROOT_ID);
    }

    function shown(element) {
        return element !== null && element.offsetParent !== null;
    }

    // --- hints -------------------------------------------------------------------------------------

    function hintFor(text) {
        const hints = window.supermergerHints || {labels: {}, patterns: []};
        if (Object.prototype.hasOwnProperty.call(hints.labels, text)) return hints.labels[text];
        for (const [pattern, hint] of hints.patterns) {
            const found = new RegExp(pattern).exec(text);
            if (found) return found[0].replace(new RegExp(pattern), hint);
        }
        return null;
    }

    function setHint(element, text) {
        const hint = hintFor(text.trim());
        if (hint && element.title !== hint) element.title = hint;
    }

    // Labels put the hint on the whole control (its .block), buttons on themselves.
    function addHints(tab) {
        for (const label of tab.querySelectorAll(LABEL)) {
            const block = label.closest(".block") || label;
            if (!isWeightBox(block)) setHint(block, label.textContent);
            setHint(label, label.textContent);
        }
        for (const button of tab.querySelectorAll("button")) setHint(button, button.textContent);
    }

    // --- Ctrl+Enter ----------------------------------------------------------------------------------

    function runButton(tab) {
        for (const selector of RUN_BUTTONS) {
            const button = tab.querySelector(selector);
            if (shown(button)) return button;
        }
        return null; // another sub-tab (XYZ, LoRA, …) is open, or the tab is hidden
    }

    function onKeyDown(event) {
        if (event.key !== "Enter" || !(event.ctrlKey || event.metaKey)) return;
        const tab = root();
        if (!tab || !shown(tab)) return;
        const button = runButton(tab);
        if (!button) return;
        event.preventDefault();
        event.stopPropagation(); // A1111's own Ctrl+Enter looks for a Generate button this tab lacks
        button.click();
    }

    // --- copy buttons --------------------------------------------------------------------------------

    function labelOf(block) {
        const label = block.querySelector(LABEL);
        return label ? label.textContent.trim() : "";
    }

    function boxOf(block) {
        return block.querySelector("textarea, input[type=text]");
    }

    function copyText(text) {
        if (navigator.clipboard && window.isSecureContext) return navigator.clipboard.writeText(text);
        // A web UI served over plain HTTP to another machine (--listen) has no clipboard API.
        const scratch = document.createElement("textarea");
        scratch.value = text;
        document.body.appendChild(scratch);
        scratch.select();
        document.execCommand("copy");
        scratch.remove();
        return Promise.resolve();
    }

    function copyButton(block) {
        const button = document.createElement("button");
        button.type = "button";
        button.className = "supermerger-copy";
        button.textContent = "copy";
        button.title = "Copy to the clipboard";
        button.addEventListener("click", (event) => {
            event.preventDefault();
            event.stopPropagation();
            const box = boxOf(block);
            copyText(box ? box.value : "").then(() => flash(button, "copied"), () => flash(button, "no clipboard"));
        });
        return button;
    }

    function flash(button, text) {
        button.textContent = text;
        setTimeout(() => { button.textContent = "copy"; }, 1500);
    }

    // The button goes at the block's top right, outside its <label>: inside, it would be labelled by it.
    function addCopyButtons(tab) {
        for (const label of tab.querySelectorAll(LABEL)) {
            if (!COPYABLE.includes(label.textContent.trim())) continue;
            const block = label.closest(".block");
            if (!block || block.querySelector(".supermerger-copy")) continue;
            block.appendChild(copyButton(block));
        }
    }

    // --- the sliders' values as the readable weight form -----------------------------------------------

    function isWeightBox(block) {
        return WEIGHT_BOXES.includes(labelOf(block));
    }

    // "BASE:0.5, IN00:1, …" from the shown block sliders (a hidden group belongs to another architecture).
    function slidersAsWeights(tab) {
        const pairs = [];
        for (const column of tab.querySelectorAll(SLIDER_COLUMNS)) {
            if (!shown(column)) continue;
            for (const number of column.querySelectorAll('input[type="number"]')) {
                const block = number.closest(".block");
                if (!shown(block) || pairs.some((pair) => pair.block === block)) continue;
                pairs.push({block, text: `${labelOf(block)}:${number.value}`});
            }
        }
        return pairs.map((pair) => pair.text).join(", ");
    }

    function showSliderValues(event) {
        const tab = root();
        const block = event.target.closest && event.target.closest(".block");
        if (!tab || !block || !tab.contains(block) || !isWeightBox(block)) return;
        const weights = slidersAsWeights(tab);
        block.title = `${hintFor(labelOf(block)) || ""}\nThe sliders now: ${weights}`;
    }

    // --- wiring --------------------------------------------------------------------------------------

    let pending = false;

    function refresh() {
        pending = false;
        const tab = root();
        if (!tab) return;
        addHints(tab);
        addCopyButtons(tab);
    }

    function schedule() {
        if (pending) return;
        pending = true;
        requestAnimationFrame(refresh);
    }

    function start() {
        new MutationObserver(schedule).observe(document.documentElement, {childList: true, subtree: true});
        document.addEventListener("keydown", onKeyDown, true);
        document.addEventListener("mouseover", showSliderValues, true);
        schedule();
    }

    if (window.supermergerTabStarted) return; // loaded once per page, whichever way the host loads scripts
    window.supermergerTabStarted = true;
    start();
})();
