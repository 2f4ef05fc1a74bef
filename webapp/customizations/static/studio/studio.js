/* Carry-On Studio: progressive enhancement for the server-rendered pages.
 *
 * Every page works without this file. With it: drag and drop with an upload progress bar,
 * live job updates (polling the page's JSON twin), the new-job time estimate, streamed chat
 * in the playground (/v1/chat/completions, SSE over fetch), confirmations and copy buttons.
 * Plain ES2017, no dependencies, no build step.
 */
(function () {
  "use strict";

  function csrfToken() {
    var meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.getAttribute("content") : "";
  }

  function $(root, selector) { return root.querySelector(selector); }
  function $all(root, selector) { return Array.prototype.slice.call(root.querySelectorAll(selector)); }

  /* -- confirmations and copy buttons ----------------------------------------------- */

  function initConfirm() {
    $all(document, "form[data-confirm]").forEach(function (form) {
      form.addEventListener("submit", function (event) {
        if (!window.confirm(form.getAttribute("data-confirm"))) event.preventDefault();
      });
    });
  }

  function initCopy() {
    $all(document, "[data-copy]").forEach(function (button) {
      var source = document.querySelector(button.getAttribute("data-copy"));
      var status = button.parentNode.querySelector("[data-copy-status]");
      if (!source) return;
      button.hidden = false;
      button.addEventListener("click", function () {
        var done = function () { if (status) status.textContent = "Copied."; };
        if (navigator.clipboard && window.isSecureContext) {
          navigator.clipboard.writeText(source.value).then(done, function () {
            source.select();
            if (status) status.textContent = "Selected: press Ctrl+C to copy.";
          });
        } else {
          source.select();
          if (document.execCommand && document.execCommand("copy")) done();
          else if (status) status.textContent = "Selected: press Ctrl+C to copy.";
        }
      });
    });
  }

  /* -- upload: drag and drop, progress bar ------------------------------------------- */

  function initUpload(form) {
    var zone = $(form, ".dropzone");
    var input = $(form, "input[type=file]");
    var box = $(form, "[data-upload-status]");
    var bar = $(form, "[data-upload-progress]");
    var percent = $(form, "[data-upload-percent]");
    var name = $(form, "[data-upload-name]");
    var live = $(form, "[data-upload-live]");
    var errors = $(form, "[data-upload-errors]");
    var button = $(form, "button[type=submit]");
    var busy = false;

    function showErrors(list) {
      errors.innerHTML = "";
      list.forEach(function (text) {
        var item = document.createElement("li");
        item.textContent = text;
        errors.appendChild(item);
      });
      errors.hidden = list.length === 0;
    }

    function upload(file) {
      if (busy) return;
      busy = true;
      button.disabled = true;
      showErrors([]);
      box.hidden = false;
      name.textContent = file.name;
      bar.value = 0;
      percent.textContent = "0%";
      live.textContent = "Uploading " + file.name;
      var data = new FormData();
      data.append("csrfmiddlewaretoken", csrfToken());
      data.append(input.name, file, file.name);
      var xhr = new XMLHttpRequest();
      xhr.open("POST", form.getAttribute("action") || window.location.pathname);
      xhr.setRequestHeader("Accept", "application/json");
      xhr.setRequestHeader("X-CSRFToken", csrfToken());
      xhr.upload.addEventListener("progress", function (event) {
        if (!event.lengthComputable) return;
        var value = Math.round((100 * event.loaded) / event.total);
        bar.value = value;
        percent.textContent = value + "%";
      });
      xhr.addEventListener("load", function () {
        var body = null;
        try { body = JSON.parse(xhr.responseText); } catch (e) { body = null; }
        if (xhr.status === 200 && body && body.redirect) {
          bar.value = 100;
          percent.textContent = "100%";
          live.textContent = "Uploaded; validating done. Opening the report.";
          window.location.assign(body.redirect);
          return;
        }
        busy = false;
        button.disabled = false;
        box.hidden = true;
        var messages = (body && body.errors && body.errors.length) ? body.errors
          : ["The upload failed (HTTP " + xhr.status + "). Try again."];
        showErrors(messages);
        live.textContent = messages.join(" ");
      });
      xhr.addEventListener("error", function () {
        busy = false;
        button.disabled = false;
        box.hidden = true;
        showErrors(["The upload failed: the server could not be reached."]);
      });
      xhr.send(data);
    }

    ["dragenter", "dragover"].forEach(function (type) {
      zone.addEventListener(type, function (event) {
        event.preventDefault();
        zone.classList.add("over");
      });
    });
    ["dragleave", "dragend", "drop"].forEach(function (type) {
      zone.addEventListener(type, function () { zone.classList.remove("over"); });
    });
    zone.addEventListener("drop", function (event) {
      event.preventDefault();
      var files = event.dataTransfer && event.dataTransfer.files;
      if (files && files.length) upload(files[0]);
    });
    form.addEventListener("submit", function (event) {
      if (!input.files || !input.files.length) return; // the server says what is missing
      event.preventDefault();
      upload(input.files[0]);
    });
  }

  /* -- job page: live updates ------------------------------------------------------------ */

  function initJob(root) {
    if (root.getAttribute("data-terminal") === "true") return;
    var url = root.getAttribute("data-live-url");
    var field = function (name) { return $(root, '[data-field="' + name + '"]'); };
    var curve = $(root, '[data-region="curve"]');
    var events = $(root, '[data-region="events"]');
    var last = { curve: null, status: root.getAttribute("data-status") };
    // The log is read incrementally: only rows after the newest seq shown come back.
    var after = root.getAttribute("data-last-seq") || null;
    var delay = 1500;
    var MAX_ROWS = 200;

    function addRows(html) {
      var body = events.querySelector("tbody");
      if (!body) { after = null; return; } // no table yet: the next poll sends it whole
      var holder = document.createElement("tbody");
      holder.innerHTML = html;
      var rows = Array.prototype.slice.call(holder.children).reverse(); // oldest first
      rows.forEach(function (row) {
        var seq = row.getAttribute("data-seq");
        if (body.querySelector('tr[data-seq="' + seq + '"]')) return; // seen (overlap)
        var before = Array.prototype.find.call(body.children, function (other) {
          return Number(other.getAttribute("data-seq")) < Number(seq);
        });
        body.insertBefore(row, before || null);
      });
      while (body.children.length > MAX_ROWS) body.removeChild(body.lastElementChild);
    }

    function apply(state) {
      var badge = field("status");
      badge.textContent = state.status_display;
      badge.className = "badge status-" + state.status;
      field("stage").textContent = state.stage;
      field("stage-wrap").hidden = !state.stage || state.terminal;
      var value = state.percent;
      field("progress").value = value;
      field("progress").textContent = value + "%";
      field("percent").textContent = value;
      field("eta").textContent = state.eta || "";
      var elapsed = field("elapsed");
      if (elapsed) elapsed.textContent = state.elapsed || "";
      if (state.curve_html !== last.curve) { curve.innerHTML = state.curve_html; last.curve = state.curve_html; }
      if (state.events_html !== undefined) events.innerHTML = state.events_html;
      else if (state.event_rows_html) addRows(state.event_rows_html);
      if (after !== null || state.events_html !== undefined) after = String(state.last_seq);
      $all(root, "form[data-when]").forEach(function (form) {
        form.hidden = !state[form.getAttribute("data-when")];
      });
      root.setAttribute("data-status", state.status);
    }

    function poll() {
      var query = after !== null ? "?after=" + encodeURIComponent(after) : "";
      fetch(url + query, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (response) {
          if (!response.ok) throw new Error("HTTP " + response.status);
          return response.json();
        })
        .then(function (state) {
          delay = 1500;
          apply(state);
          // The final page has more (the adapter, the playground link): load it once.
          if (state.terminal) window.location.reload();
          else window.setTimeout(poll, delay);
        })
        .catch(function () {
          delay = Math.min(delay * 2, 15000); // the server restarts or the network drops
          window.setTimeout(poll, delay);
        });
    }
    window.setTimeout(poll, delay);
  }

  /* -- new job: the time estimate ------------------------------------------------------ */

  function initEstimate(form) {
    var url = form.getAttribute("data-estimate-url");
    var output = document.getElementById("estimate");
    var names = ["training_file", "model", "n_epochs", "d_model", "n_blocks", "preset", "kind", "depth"];
    var pending = null;

    // Only the chosen kind's size fields show (a preset's kind, or Custom's kind field).
    function showKind() {
      var preset = form.elements["preset"] ? form.elements["preset"].value : "";
      var chosen = preset && form.querySelector('input[name="preset"][value="' + preset + '"]');
      var kind = chosen ? chosen.closest(".preset-option").getAttribute("data-kind") : "";
      var custom = !preset || preset === "custom";
      if (custom) kind = form.elements["kind"] ? form.elements["kind"].value : "carry_on";
      $all(form, "fieldset[data-kind]").forEach(function (set) {
        // A field with an error stays in view, so the message can be read and fixed.
        set.hidden = set.getAttribute("data-kind") !== kind && !set.querySelector(".has-error");
      });
      $all(form, "[data-when-custom]").forEach(function (el) { el.hidden = !custom; });
    }

    function refresh() {
      var query = new URLSearchParams();
      names.forEach(function (name) {
        var element = form.elements[name];
        if (element && element.value) query.set(name, element.value);
      });
      if (!query.get("training_file")) { output.textContent = "choose a dataset"; return; }
      fetch(url + "?" + query.toString(), { credentials: "same-origin" })
        .then(function (response) { return response.json(); })
        .then(function (body) {
          output.textContent = body.text || "unknown (the dataset's tokens were not counted)";
          Object.keys(body.presets || {}).forEach(function (name) {
            var span = document.getElementById("estimate-" + name);
            if (span && body.presets[name]) span.textContent = body.presets[name];
          });
        })
        .catch(function () { /* keep the last estimate */ });
    }
    names.forEach(function (name) {
      var element = form.elements[name];
      if (!element) return;
      var handler = function () {
        showKind();
        window.clearTimeout(pending);
        pending = window.setTimeout(refresh, 250);
      };
      // A group of radio buttons is a RadioNodeList: listen on each button.
      var targets = element.addEventListener ? [element] : Array.prototype.slice.call(element);
      targets.forEach(function (target) {
        target.addEventListener("change", handler);
        target.addEventListener("input", handler);
      });
    });
    showKind();
  }

  /* -- playground: streamed chat ------------------------------------------------------- */

  function streamChat(url, body, onDelta, signal) {
    return fetch(url, {
      method: "POST",
      credentials: "same-origin",
      signal: signal,
      headers: { "Content-Type": "application/json", "X-CSRFToken": csrfToken() },
      body: JSON.stringify(body),
    }).then(function (response) {
      if (!response.ok) {
        return response.json().then(
          function (error) { throw new Error((error.error && error.error.message) || ("HTTP " + response.status)); },
          function () { throw new Error("HTTP " + response.status); }
        );
      }
      var reader = response.body.getReader();
      var decoder = new TextDecoder();
      var buffer = "";
      function handle(block) {
        var finished = false;
        block.split("\n").forEach(function (line) {
          if (line.indexOf("data: ") !== 0) return;
          var data = line.slice(6);
          if (data === "[DONE]") { finished = true; return; }
          var chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          (chunk.choices || []).forEach(function (choice) {
            if (choice.delta && choice.delta.content) onDelta(choice.delta.content);
          });
        });
        return finished;
      }
      function pump() {
        return reader.read().then(function (result) {
          if (result.done) return;
          buffer += decoder.decode(result.value, { stream: true });
          var index;
          while ((index = buffer.indexOf("\n\n")) >= 0) {
            var block = buffer.slice(0, index);
            buffer = buffer.slice(index + 2);
            if (handle(block)) return reader.cancel();
          }
          return pump();
        });
      }
      return pump();
    });
  }

  function initPlayground(form) {
    var url = form.getAttribute("data-chat-url");
    var panes = $all(form, "[data-pane]");
    var panesBox = $(form, "[data-panes]");
    var model = $(form, "[data-model]");
    var compare = $(form, "[data-compare]");
    var compareModel = $(form, "[data-compare-model]");
    var compareField = $(form, "[data-compare-field]");
    var prompt = form.elements.prompt;
    var send = $(form, "[data-send]");
    var stop = $(form, "[data-stop]");
    var clear = $(form, "[data-clear]");
    var status = $(form, "[data-chat-status]");
    var histories = [[], []];
    var controllers = [];

    function models() { return compare.checked ? [model.value, compareModel.value] : [model.value]; }

    function layout() {
      var both = compare.checked;
      panes[1].hidden = !both;
      compareField.hidden = !both;
      panesBox.classList.toggle("side-by-side", both);
      $(panes[0], "[data-pane-title]").textContent = model.value;
      $(panes[1], "[data-pane-title]").textContent = compareModel.value;
    }

    function message(pane, role, text) {
      var transcript = $(pane, "[data-transcript]");
      var empty = $(transcript, "[data-empty]");
      if (empty) empty.remove();
      var box = document.createElement("div");
      box.className = "msg " + role;
      var who = document.createElement("div");
      who.className = "who";
      who.textContent = role === "user" ? "You" : role === "error" ? "Error" : "Assistant";
      var body = document.createElement("div");
      body.className = "text";
      body.textContent = text;
      box.appendChild(who);
      box.appendChild(body);
      transcript.appendChild(box);
      transcript.scrollTop = transcript.scrollHeight;
      return body;
    }

    function reset() {
      controllers.forEach(function (c) { c.abort(); });
      histories = [[], []];
      panes.forEach(function (pane) {
        var transcript = $(pane, "[data-transcript]");
        transcript.innerHTML = '<p class="empty" data-empty>Send a message to start the conversation.</p>';
      });
      status.textContent = "New conversation.";
      prompt.focus();
    }

    function number(name, fallback) {
      var value = parseFloat(form.elements[name].value);
      return isNaN(value) ? fallback : value;
    }

    function ask(index, name, text) {
      var pane = panes[index];
      var history = histories[index];
      history.push({ role: "user", content: text });
      message(pane, "user", text);
      var answer = message(pane, "assistant", "");
      var transcript = $(pane, "[data-transcript]");
      answer.setAttribute("data-answer", "");
      answer.setAttribute("data-chunks", "0");
      transcript.setAttribute("aria-busy", "true");
      var system = form.elements.system.value.trim();
      var messages = (system ? [{ role: "system", content: system }] : []).concat(history);
      var controller = new AbortController();
      controllers.push(controller);
      var chunks = 0;
      return streamChat(url, {
        model: name,
        messages: messages,
        stream: true,
        temperature: number("temperature", 0.7),
        top_p: number("top_p", 1),
        max_tokens: Math.round(number("max_tokens", 128)),
      }, function (delta) {
        chunks += 1;
        answer.textContent += delta;
        answer.setAttribute("data-chunks", String(chunks));
        transcript.scrollTop = transcript.scrollHeight;
      }, controller.signal).then(function () {
        history.push({ role: "assistant", content: answer.textContent });
      }, function (error) {
        if (error.name === "AbortError") {
          history.push({ role: "assistant", content: answer.textContent });
          answer.textContent += " [stopped]";
          return;
        }
        history.pop();
        answer.parentNode.className = "msg error";
        answer.textContent = error.message;
      }).then(function () {
        answer.setAttribute("data-done", "true");
        transcript.removeAttribute("aria-busy");
      });
    }

    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var text = prompt.value.trim();
      if (!text) { status.textContent = "Type a message first."; prompt.focus(); return; }
      prompt.value = "";
      send.disabled = true;
      stop.hidden = false;
      status.textContent = "Answering…";
      controllers = [];
      var names = models();
      Promise.all(names.map(function (name, index) { return ask(index, name, text); })).then(function () {
        send.disabled = false;
        stop.hidden = true;
        status.textContent = names.length > 1 ? "Both answers complete." : "Answer complete.";
        prompt.focus();
      });
    });
    prompt.addEventListener("keydown", function (event) {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        if (!send.disabled) form.requestSubmit();
      }
    });
    stop.addEventListener("click", function () { controllers.forEach(function (c) { c.abort(); }); });
    clear.hidden = false;
    clear.addEventListener("click", reset);
    [model, compare, compareModel].forEach(function (element) { element.addEventListener("change", layout); });
    layout();
  }

  /* -- start ---------------------------------------------------------------------------- */

  function start() {
    initConfirm();
    initCopy();
    $all(document, "form[data-upload]").forEach(initUpload);
    var job = document.getElementById("job");
    if (job && job.getAttribute("data-live-url")) initJob(job);
    var jobForm = document.getElementById("job-form");
    if (jobForm) initEstimate(jobForm);
    var playground = document.getElementById("playground");
    if (playground) initPlayground(playground);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
