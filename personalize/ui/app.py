"""The gradio page: four tabs (Train, Generate, Compare, Gallery) wired to :class:`.studio.Studio`'s handlers.

Every handler's :class:`personalize.errors.PersonalizeError` is shown in the tab's message line as it is (the
CLI's one-line message); nothing else here decides or checks anything. gradio is imported only in this module,
with its analytics off (``GRADIO_ANALYTICS_ENABLED=False`` before the import) and no share link.
"""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

from ..errors import BadInputError, PersonalizeError
from .studio import Studio, knob_controls, recipe

SLOTS = 3  # concepts composed at once on the Generate tab
INSTALL = "the web app needs gradio: pip install 'personalize[ui]'"
CSS = """
.pixelated img, img.pixelated {image-rendering: pixelated;}
#train-progress progress {width: 100%; height: 18px;}
#gen-images img, #train-samples img, #gallery img {width: 192px !important; height: 192px !important;
    object-fit: contain; image-rendering: pixelated;}
.ui-error {color: #b00020; font-weight: 600;}
.ui-info {color: #1b5e20;}
"""


def import_gradio():
    """gradio with its analytics off, or a one-line BadInputError naming the extra to install."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("GRADIO_TELEMETRY_ENABLED", "False")
    try:
        import gradio
    except ImportError:
        raise BadInputError(INSTALL) from None
    return gradio


def _message(text: str = "", error: bool = False) -> str:
    if not text:
        return ""
    kind = "ui-error" if error else "ui-info"
    return f'<div class="{kind}" data-testid="ui-message">{"error: " if error else ""}{html.escape(text)}</div>'


def _all_knobs() -> list[str]:
    """Every knob name of every method, in registry order (the Generate tab's controls per slot)."""
    from .. import methods as registry
    from ..knobs import specs

    names: list[str] = []
    for method in registry.names():
        for name in specs(registry.card(method).Knobs):
            if name not in names:
                names.append(name)
    return names


def _progress_html(status: dict[str, Any] | None) -> str:
    if not status:
        return '<div id="train-progress">no run yet</div>'
    step, total, state = status["step"], max(status["total"], 1), status["state"]
    loss = f" · loss {status['losses'][-1][1]:.4f}" if status["losses"] else ""
    queued = f" · {status['queued_before']} run(s) waiting" if status["queued_before"] else ""
    return (f'<div id="train-progress" data-state="{state}" data-step="{step}"><progress value="{step}" '
            f'max="{total}"></progress><div>{html.escape(state)}: step {step} / {total}{loss}{queued}</div></div>')


def build(studio: Studio):
    """The gradio Blocks of ``studio`` (not launched)."""
    gr = import_gradio()
    import pandas as pd

    from .. import methods as registry

    knob_names = _all_knobs()
    jobs = studio.queue.jobs

    def names() -> list[str]:
        return [c["name"] for c in studio.library() if "error" not in c]

    with gr.Blocks(title="personalize", analytics_enabled=False) as demo:
        gr.Markdown(f"## personalize\nbase **{html.escape(studio.base)}** · device **{studio.device}** · "
                    f"folder `{studio.folder}`")
        with gr.Tab("Train", id="train"):
            with gr.Row():
                with gr.Column():
                    photos = gr.File(file_count="multiple", label=f"Photos, and captions as photo.txt ({studio.limits.text()})",
                                     elem_id="photos")
                    folder_pick = gr.File(file_count="directory", label="... or a folder of photos", elem_id="photo-folder")
                    masks = gr.File(file_count="multiple", label="Masks (optional, one per photo, same name)",
                                    elem_id="masks")
                    with gr.Row():
                        token = gr.Textbox(label="Token", value="<my-concept>", elem_id="token")
                        superclass = gr.Textbox(label="Superclass", placeholder="teddy bear", elem_id="superclass")
                        name = gr.Textbox(label="Name (default: the token)", elem_id="name")
                    method = gr.Dropdown(registry.names(), value="perfusion", label="Method", elem_id="method")
                    first_recipe, first_settings = recipe("perfusion")
                    recipe_md = gr.Markdown(f"**Recipe:** {html.escape(first_recipe)}")
                    settings = gr.Textbox(first_settings, lines=6, label="Settings (the CLI's --set KEY=VALUE, one per "
                                          "line; masks: the uploaded ones, else none; masks=auto segments with CLIPSeg)",
                                          elem_id="settings")
                    with gr.Row():
                        train_btn = gr.Button("Train", variant="primary", elem_id="train-btn")
                        cancel_btn = gr.Button("Cancel", elem_id="cancel-btn")
                    with gr.Row():
                        stopped = gr.Dropdown(studio.stopped_runs(), label="Stopped runs", elem_id="stopped")
                        resume_btn = gr.Button("Resume", elem_id="resume-btn")
                    train_msg = gr.HTML(elem_id="train-msg")
                with gr.Column():
                    progress = gr.HTML(_progress_html(None))
                    loss_plot = gr.LinePlot(pd.DataFrame({"step": [], "loss": []}), x="step", y="loss",
                                            label="Loss", elem_id="loss-plot")
                    samples = gr.Gallery(label="Validation samples", columns=4, height=220, object_fit="contain", elem_id="train-samples",
                                         elem_classes=["pixelated"])
            job_id = gr.State(None)

            def on_method(m):
                text, values = recipe(m)
                return f"**Recipe:** {html.escape(text)}", values

            method.change(on_method, method, [recipe_md, settings])

            def on_train(files, picked, mask_files, tok, sc, meth, nm, sets):
                try:
                    job = studio.train([*(files or []), *(picked or [])], tok, sc, meth, nm, sets, mask_files or [])
                except PersonalizeError as exc:
                    return None, _message(str(exc), True)
                return job.id, _message(f"queued run '{job.name}' (job {job.id})")

            train_btn.click(on_train, [photos, folder_pick, masks, token, superclass, method, name, settings], [job_id, train_msg])

            def on_cancel(jid):
                if jid is None or jid not in jobs:
                    return _message("no run to cancel", True)
                studio.queue.cancel(jid)
                return _message(f"cancelling run '{jobs[jid].name}' after its current step")

            cancel_btn.click(on_cancel, job_id, train_msg)

            def on_resume(run_name):
                try:
                    job = studio.resume(run_name or "")
                except PersonalizeError as exc:
                    return None, _message(str(exc), True)
                return job.id, _message(f"resuming run '{job.name}' (job {job.id})")

            resume_btn.click(on_resume, stopped, [job_id, train_msg])

            def on_tick(jid, seen):
                """The run's progress; the plot, samples and message only when they changed (a re-drawn plot
                every tick would cost the browser's CPU, which a CPU run shares)."""
                if jid is None or jid not in jobs:
                    return (gr.skip(),) * 6
                status = studio.status(jobs[jid])
                now = (jid, status["state"], status["step"], len(status["samples"]), status["message"])
                if now == seen:
                    return (gr.skip(),) * 6
                frame = pd.DataFrame(status["losses"], columns=["step", "loss"])
                pics = [(str(p), p.parent.name) for p in status["samples"][-8:]]
                message = _message(status["message"], status["state"] == "failed") if status["message"] else gr.skip()
                runs = gr.update(choices=studio.stopped_runs()) if status["state"] != "running" else gr.skip()
                return _progress_html(status), frame, pics, message, runs, now

            seen = gr.State(None)
            gr.Timer(1.0).tick(on_tick, [job_id, seen], [progress, loss_plot, samples, train_msg, stopped, seen],
                               show_progress="hidden", concurrency_limit=None)

        with gr.Tab("Generate", id="generate"):
            refresh = gr.Button("Refresh library", size="sm", elem_id="refresh-library")
            slots, slot_controls = [], []
            with gr.Row():
                for i in range(SLOTS):
                    with gr.Column(min_width=220):
                        pick = gr.Dropdown(names(), value=None, label=f"Concept {i + 1}", elem_id=f"concept-{i}",
                                           allow_custom_value=False)
                        controls = {}
                        for knob in knob_names:
                            controls[knob] = gr.Slider(0, 1, value=0.5, step=0.01, label=knob, visible=False,
                                                       elem_id=f"knob-{i}-{knob}")
                        slots.append(pick)
                        slot_controls.append(controls)
            with gr.Row():
                prompt = gr.Textbox(label="Prompt", value="a photo of a <my-concept>", elem_id="prompt", scale=3)
                negative = gr.Textbox(label="Negative prompt", elem_id="negative", scale=2)
            defaults = studio.sampling_defaults()
            with gr.Row():
                seed = gr.Number(0, label="Seed", precision=0, elem_id="seed")
                steps = gr.Number(defaults["steps"], label="Steps", precision=0, elem_id="steps")
                guidance = gr.Number(defaults["guidance"], label="Guidance", elem_id="guidance")
                count = gr.Number(1, label="Images", precision=0, elem_id="num-images")
            gen_btn = gr.Button("Generate", variant="primary", elem_id="generate-btn")
            gen_msg = gr.HTML(elem_id="gen-msg")
            result = gr.Gallery(label="Images", columns=4, height=260, object_fit="contain", preview=False, elem_id="gen-images", elem_classes=["pixelated"])

            library = {}

            def control_updates(concept_name):
                """Per knob: shown (with the concept's own value) when its method takes it."""
                info = library.get(concept_name)
                given = {c.name: c for c in info["knobs"]} if info else {}
                out = []
                for knob in knob_names:
                    c = given.get(knob)
                    if c is None:
                        out.append(gr.update(visible=False))
                    elif c.kind == "slider":
                        out.append(gr.Slider(c.low, c.high, value=c.value, step=0.01, label=knob, visible=True,
                                             info=c.help[:90]))
                    elif c.kind == "checkbox":
                        out.append(gr.Slider(0, 1, value=int(bool(c.value)), step=1, label=f"{knob} (0 off, 1 on)",
                                             visible=True, info=c.help[:90]))
                    else:
                        out.append(gr.Slider(0, len(c.choices) - 1, value=c.choices.index(c.value), step=1,
                                             label=f"{knob}: " + ", ".join(f"{j}={v}" for j, v in enumerate(c.choices)),
                                             visible=True, info=c.help[:90]))
                return out

            def on_refresh():
                library.clear()
                library.update({c["name"]: c for c in studio.library() if "error" not in c})
                return [gr.update(choices=list(library)) for _ in slots]

            refresh.click(on_refresh, None, slots)
            demo.load(on_refresh, None, slots)
            for pick, controls in zip(slots, slot_controls):
                pick.change(control_updates, pick, list(controls.values()))

            def knob_value(concept_name, knob, value):
                spec = next(c for c in library[concept_name]["knobs"] if c.name == knob)
                if spec.kind == "checkbox":
                    return bool(round(value))
                if spec.kind == "choice":
                    return spec.choices[int(round(value))]
                return float(value)

            flat_controls = [c for controls in slot_controls for c in controls.values()]

            def on_generate(*args):
                picks, rest = args[:SLOTS], args[SLOTS:]
                values, (p, neg, sd, st, gd, n) = rest[:len(flat_controls)], rest[len(flat_controls):]
                selection = []
                for i, concept_name in enumerate(picks):
                    if not concept_name:
                        continue
                    given = {c.name for c in library.get(concept_name, {}).get("knobs", [])}
                    row = values[i * len(knob_names):(i + 1) * len(knob_names)]
                    selection.append((concept_name, {k: knob_value(concept_name, k, v)
                                                     for k, v in zip(knob_names, row) if k in given}))
                try:
                    paths = studio.generate(selection, p, neg, sd, st, gd, n)
                except PersonalizeError as exc:
                    return gr.skip(), _message(str(exc), True)
                from ..prompts import missing_tokens

                shown = ", ".join(f"{n}: " + " ".join(f"{k}={v}" for k, v in kn.items()) for n, kn in selection)
                missing = missing_tokens(p, [library[n]["token"] for n, _ in selection if n in library])
                warn = f" · warning: the prompt does not name {', '.join(missing)}" if missing else ""
                return [str(x) for x in paths], _message(f"{len(paths)} image(s) · {shown or 'the base alone'}{warn}")

            gen_inputs = [*slots, *flat_controls, prompt, negative, seed, steps, guidance, count]
            gen_btn.click(on_generate, gen_inputs, [result, gen_msg])
            for control in flat_controls:  # a knob moved: the same selection again, its knob set in place
                control.release(on_generate, gen_inputs, [result, gen_msg])

        with gr.Tab("Compare", id="compare"):
            with gr.Row():
                cmp_names = gr.Dropdown(names(), multiselect=True, label="Concepts", elem_id="compare-concepts")
                cmp_prompt = gr.Textbox("a photo of a {}", label="Prompt ({} = each concept's token)",
                                        elem_id="compare-prompt")
                cmp_seed = gr.Number(0, label="Seed", precision=0, elem_id="compare-seed")
            with gr.Row():
                cmp_knob = gr.Dropdown(["none", *knob_names], value="none", label="Knob to sweep", elem_id="compare-knob")
                cmp_values = gr.Textbox("0.6, 0.7, 0.8", label="Its values", elem_id="compare-values")
                toy_names = []
                if studio.base == "toy":
                    from ..datasets.toyworld.concepts import CONCEPTS

                    toy_names = list(CONCEPTS)
                cmp_toy = gr.Dropdown(["none", *toy_names], value="none", visible=studio.base == "toy",
                                      label="Score against the toy world's concept (ground truth)",
                                      elem_id="compare-toy")
                cmp_clip = gr.Checkbox(False, label="CLIP-T / CLIP-I / DINO-I scores (--clip-weights / --dino-weights, "
                                                    "else the hub's)",
                                       elem_id="compare-clip")
            cmp_btn = gr.Button("Compare", variant="primary", elem_id="compare-btn")
            cmp_msg = gr.HTML(elem_id="compare-msg")
            cmp_grid = gr.Image(label="Grid", type="filepath", elem_id="compare-grid", elem_classes=["pixelated"])
            cmp_table = gr.Dataframe(headers=["concept", "knob", "value", "alignment", "fidelity", "clip_text",
                                              "clip_image", "dino_image"],
                                     elem_id="compare-scores")

            def on_compare(chosen, template, sd, knob, vals, toy, clip):
                try:
                    out = studio.compare(chosen or [], template, sd, None if knob == "none" else knob, vals,
                                         None if toy == "none" else toy, clip=bool(clip))
                except PersonalizeError as exc:
                    return gr.skip(), gr.skip(), _message(str(exc), True)
                rows = [[r["concept"], r["knob"] or "", "" if r["value"] is None else r["value"],
                         r["alignment"], r["fidelity"], r.get("clip_text"), r.get("clip_image"), r.get("dino_image")]
                        for r in out["rows"]]
                return str(out["grid"]), rows, _message(f"{len(rows)} image(s) in {out['folder']}")

            with gr.Accordion("Benchmark reports in the app folder (reports/NAME/index.html)", open=False):
                reports = gr.HTML(elem_id="reports")

            def on_reports():
                found = studio.reports()
                if not found:
                    return ("<p>none yet: <code>personalize benchmark report DB --out "
                            f"{html.escape(str(studio.folder / 'reports' / 'NAME'))}</code> puts one here</p>")
                return "<ul>" + "".join(f'<li><a href="/gradio_api/file={html.escape(str(p))}" target="_blank">'
                                        f"{html.escape(p.parent.name)}</a></li>" for p in found) + "</ul>"

            demo.load(on_reports, None, reports)
            cmp_btn.click(on_compare, [cmp_names, cmp_prompt, cmp_seed, cmp_knob, cmp_values, cmp_toy, cmp_clip],
                          [cmp_grid, cmp_table, cmp_msg])
            refresh.click(lambda: gr.update(choices=names()), None, cmp_names)
            demo.load(lambda: gr.update(choices=names()), None, cmp_names)

        with gr.Tab("Gallery", id="gallery"):
            gal_refresh = gr.Button("Refresh", size="sm", elem_id="gallery-refresh")
            gal = gr.Gallery(label="Gallery (settings saved beside each image as JSON)", columns=6, height=400,
                             elem_id="gallery", elem_classes=["pixelated"])
            gal_settings = gr.JSON(label="Settings of the selected image")
            shown_paths = gr.State([])

            def on_gallery():
                items = studio.gallery()
                return [(str(p), c) for p, c in items], [str(p) for p, _ in items]

            def on_select(paths, evt: gr.SelectData):
                import json

                try:
                    return json.loads(Path(paths[evt.index]).with_suffix(".json").read_text())
                except (OSError, ValueError, IndexError, TypeError):
                    return None

            on_select.__annotations__["evt"] = gr.SelectData  # gradio reads the type (this module's are strings)
            gal_refresh.click(on_gallery, None, [gal, shown_paths])
            demo.load(on_gallery, None, [gal, shown_paths])
            gal.select(on_select, shown_paths, gal_settings)
    return demo


def launch(studio: Studio, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Serve the page on ``host:port`` (no share link, no analytics, no server-side rendering); uploads over the
    studio's per-file limit are refused by gradio too. Returns (demo, url)."""
    demo = build(studio)
    demo.queue(default_concurrency_limit=4)
    _, url, _ = demo.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block,
                            inbrowser=False, quiet=True, allowed_paths=[str(studio.folder)], ssr_mode=False,
                            max_file_size=studio.limits.max_bytes, enable_monitoring=False, mcp_server=False,
                            pwa=False, show_error=False, css=CSS, footer_links=[])
    return demo, url
