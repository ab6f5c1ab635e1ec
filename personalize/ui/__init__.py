"""``personalize ui``: a local web app (gradio) over the same API the command line calls.

- ``uploads``: photos, masks and captions from the browser, bounded (count, bytes, pixels, image types) and
  stored under the app folder with names the app makes, never the browser's;
- ``jobs``: one worker per device, so one job at a time touches a device's pipeline (two tabs queue, never
  collide); training jobs report progress, loss and samples, and can be cancelled and resumed;
- ``studio``: the handlers, plain Python (train, library, generate and compose with knobs, gallery, compare),
  each raising the library's one-line :class:`personalize.errors.PersonalizeError` on bad input;
- ``app``: the gradio page that calls them (gradio is imported only there).
"""
