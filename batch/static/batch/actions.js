/* The dashboard's controls of one batch: Cancel, Pause, Resume and Retry failed, with the
 * confirmation dialogs of those that stop work or start a new batch. dashboard.js calls
 * BatchActions.install(ctx) once and the returned render(entry) on every update, so the
 * buttons follow the batch's status live. Each button is shown only when the status allows it
 * and the user may (own batch, or the permission; the API decides anyway). */
(function () {
  "use strict";

  function install(ctx) {
    const { config, api, applyBatch, label, allowed, problemText, fmtInt, el, TERMINAL } = ctx;
    const retryable = (b) => TERMINAL.has(b.status) && b.failed_items + b.cancelled_items > 0;
    const BUTTONS = [
      {
        name: "pause", text: "Pause…", perm: "pause",
        shown: (b) => b.status === "pending" || b.status === "running",
        click: (entry) => openPause(entry),
      },
      {
        name: "resume", text: "Resume", perm: "pause", className: "default",
        shown: (b) => b.status === "paused",
        click: (entry, button) => resume(entry, button),
      },
      {
        name: "retry", text: "Retry failed…", perm: "retry", shown: retryable,
        click: (entry) => openRetry(entry),
      },
      {
        name: "cancel", text: "Cancel…", perm: "cancel", className: "bd-danger",
        shown: (b) => !TERMINAL.has(b.status),
        enabled: (b) => b.status !== "cancelling",
        click: (entry) => openCancel(entry),
      },
    ];

    function build(box, entry) {
      for (const spec of BUTTONS) {
        const button = el("button", {
          type: "button", class: `button bd-${spec.name} ${spec.className || ""}`.trim(),
          text: spec.text, dataset: { action: spec.name },
        });
        button.addEventListener("click", () => {
          actionError(entry, "");
          spec.click(entry, button);
        });
        box.append(button);
      }
      box.append(el("span", { class: "bd-error bd-action-error", dataset: { field: "actionerror" } }));
      box.dataset.built = "1";
    }

    function render(entry) {
      const b = entry.data;
      const box = entry.el.querySelector("[data-field=actions]");
      if (!box.dataset.built) build(box, entry);
      for (const spec of BUTTONS) {
        const button = box.querySelector(`[data-action=${spec.name}]`);
        button.hidden = !spec.shown(b) || !allowed(spec.perm, b);
        if (!button.dataset.busy) button.disabled = spec.enabled ? !spec.enabled(b) : false;
      }
      const retry = box.querySelector("[data-action=retry]");
      retry.textContent = b.failed_items ? "Retry failed…" : "Retry cancelled…";
    }

    function actionError(entry, text) {
      const node = entry.el.querySelector("[data-field=actionerror]");
      if (node) node.textContent = text;
    }

    // One confirmation dialog (templates dashboard_<name>_dialog.html): open, confirm once, report.
    function dialog(name, run) {
      const node = document.querySelector(`[data-${name}-dialog]`);
      const part = (key) => node.querySelector(`[data-${name}-${key}]`);
      const confirm = part("confirm");
      const close = part("close");
      const closeText = close.textContent;
      let target = null;
      const self = {
        part: part,
        open(entry) {
          target = entry;
          part("name").textContent = label(entry.data) + " (" + entry.data.handler + ")";
          part("result").hidden = true;
          confirm.hidden = false;
          confirm.disabled = false;
          close.textContent = closeText;
          node.showModal();
        },
        show(kind, text) {
          const result = part("result");
          result.hidden = false;
          result.className = "bd-result bd-result-" + kind;
          result.dataset.kind = kind;
          (part("text") || result).textContent = text;
        },
      };
      confirm.addEventListener("click", async () => {
        confirm.disabled = true;
        try {
          await run(target, self);
        } catch (exc) {
          self.show("error", "Request failed: " + exc);
        }
        confirm.hidden = true;
        close.textContent = "Close";
      });
      close.addEventListener("click", () => node.close());
      return self;
    }

    const drainSeconds = (input) => Math.max(0, Number(input.value) || 0);

    // --- cancel --------------------------------------------------------------------------------

    const cancelDialog = dialog("cancel", async (entry, d) => {
      const drain = drainSeconds(d.part("drain"));
      d.show("pending", `Cancelling… waiting up to ${drain}s for running items to stop.`);
      const result = await api("DELETE", `${config.apiBatches}${entry.data.id}/?drain_timeout=${drain}`);
      if (result.data && result.data.id) applyBatch(result.data);
      if (result.status === 200) {
        const b = result.data || entry.data;
        d.show("ok", `Cancelled. ${fmtInt(b.cancelled_items)} items cancelled, ` +
          `${fmtInt(b.succeeded_items)} succeeded and ${fmtInt(b.failed_items)} failed before the cancel.`);
      } else if (result.status === 504) {
        d.show("warning", `Still draining after ${drain}s: the batch stays "cancelling" and ends by itself; ` +
          "items that ignore cancellation are stopped at the batch's drain deadline.");
      } else if (result.status === 409) {
        d.show("warning", "Nothing to cancel: the batch has already finished.");
      } else {
        d.show("error", "Cancel failed: " + problemText(result));
      }
    });

    function openCancel(entry) {
      cancelDialog.part("drain").value = String(Math.min(config.drainTimeout, 30));
      cancelDialog.open(entry);
    }

    // --- pause and resume ------------------------------------------------------------------------

    const pauseDialog = dialog("pause", async (entry, d) => {
      const drain = drainSeconds(d.part("drain"));
      d.show("pending", `Pausing… waiting up to ${drain}s for running items to finish.`);
      const result = await api("POST", `${config.apiBatches}${entry.data.id}/pause/?drain_timeout=${drain}`);
      const batch = result.status === 504 ? (result.data || {}).batch : result.data;
      if (batch && batch.id) applyBatch(batch);
      if (result.status === 200) {
        d.show("ok", `Paused. No item is running; ${fmtInt(result.data.pending_items)} pending items wait for Resume.`);
      } else if (result.status === 504) {
        d.show("warning", `Paused, but ${fmtInt((result.data || {}).running_items)} items still run after ${drain}s: ` +
          "they finish on their own and no new item starts.");
      } else if (result.status === 409) {
        d.show("warning", "Not paused: " + problemText(result));
      } else {
        d.show("error", "Pause failed: " + problemText(result));
      }
    });

    function openPause(entry) {
      pauseDialog.part("drain").value = String(Math.min(config.drainTimeout, 30));
      pauseDialog.open(entry);
    }

    // Resume starts work again and stops nothing: no dialog; a refusal shows next to the buttons.
    async function resume(entry, button) {
      button.disabled = true;
      button.dataset.busy = "1";
      try {
        const result = await api("POST", `${config.apiBatches}${entry.data.id}/resume/`);
        if (result.ok && result.data && result.data.id) applyBatch(result.data);
        else actionError(entry, "Not resumed: " + problemText(result));
      } catch (exc) {
        actionError(entry, "Resume failed: " + exc);
      } finally {
        delete button.dataset.busy;
        render(entry);
      }
    }

    // --- retry ------------------------------------------------------------------------------------

    const retryDialog = dialog("retry", async (entry, d) => {
      const include = d.part("cancelled").checked ? ["failed", "cancelled"] : ["failed"];
      d.part("link").hidden = true;
      d.show("pending", "Submitting the retry…");
      const result = await api("POST", `${config.apiBatches}${entry.data.id}/retry/`, { include: include });
      if ((result.status === 201 || result.status === 200) && result.data && result.data.id) {
        applyBatch(result.data); // a row on the list page; ignored on a batch's own page
        const link = d.part("link");
        link.href = config.dashboardUrl + result.data.id + "/";
        link.hidden = false;
        d.show("ok", `Submitted a new batch of ${fmtInt(result.data.total_items)} items.`);
      } else if (result.status === 409) {
        d.show("warning", "Nothing retried: " + problemText(result));
      } else {
        d.show("error", "Not retried: " + problemText(result));
      }
    });

    function openRetry(entry) {
      const b = entry.data;
      const box = retryDialog.part("cancelled");
      box.checked = b.failed_items === 0;
      box.disabled = b.failed_items === 0; // nothing failed: the cancelled ones are what there is to retry
      retryDialog.part("cancelled-row").hidden = b.cancelled_items === 0;
      retryDialog.part("cancelled-count").textContent = fmtInt(b.cancelled_items);
      retryDialog.part("count").textContent = fmtInt(b.failed_items) + " failed items";
      retryDialog.part("link").hidden = true;
      retryDialog.open(entry);
    }

    return { render: render };
  }

  window.BatchActions = { install: install };
})();
