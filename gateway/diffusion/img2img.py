"""The img2img recipe, step by step as diffusers' `StableDiffusionImg2ImgPipeline.__call__` (and, for an SDXL
manifest, `StableDiffusionXLImg2ImgPipeline.__call__`), over Triton.

The two share every step but the first: SD conditions the UNet on one text encoder's last hidden state; SDXL on
two encoders' penultimate hidden states side by side, plus the second's pooled output and the size "time ids"
(`Conditioning`). Every UNet call carries one timestep per sample, so Triton's dynamic batcher can merge the
steps of concurrent requests even when they are at different points of their schedules.

A request with a mask runs the matching inpaint pipeline's steps instead (`StableDiffusion[XL]InpaintPipeline`):
on a 4-channel UNet with the same Triton calls as img2img (the blend is numpy between them, so masked and
unmasked rows batch together), on an inpainting (9-channel) UNet with the mask and the masked image's latents
as extra `sample` channels.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import numpy as np
from tokenizers import Tokenizer

from gateway.diffusion import sampling as math
from gateway.diffusion.lora import LORA_ROLE, NO_ADAPTER, LoraChoice, LoraRegistry, row_feed
from gateway.diffusion.lora_format import LoraFileError
from gateway.diffusion.manifest import Component, ExpectedOutput, PipelineManifest, SdxlConditioning
from gateway.diffusion.schedulers import make_scheduler, scheduler_choices
from gateway.errors import BackendError, InvalidRequest
from gateway.observability import current_request_id, stage
from gateway.triton.client import DEFAULT_PRIORITY, Engine

log = logging.getLogger(__name__)


class GenerationCanceled(Exception):
    """Raised between denoising steps when the caller asked to stop (job canceled, client gone)."""


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """The request's knobs the recipe reads as they were sent. The job's spec extends this class, so a knob
    added here (and on the wire model) reaches the recipe through admission and the job store unchanged."""

    strength: float
    steps: int
    guidance_scale: float
    loras: tuple[LoraChoice, ...] = ()  # adapters and scales, checked against the model at admission


def sampling_knobs(source: object) -> dict[str, Any]:
    """`Sampling`'s fields read off `source` (a request, a job's spec), by name."""
    return {field.name: getattr(source, field.name) for field in dataclasses.fields(Sampling)}


@dataclass(frozen=True)
class Generation(Sampling):
    """What one request asks of the pipeline (validated upstream): the knobs, and what the job derives."""

    prompt: str
    negative_prompt: str
    image: np.ndarray  # [1, 3, H, W] float32 in [-1, 1], H and W multiples of the manifest's grid
    seeds: Sequence[int]  # one per output image
    scheduler_config: Mapping[str, Any] | None = None  # the request's scheduler; None: the model's own
    # The area to change: [1, 1, H, W] float32, 1 = change, 0 = keep, at the image's size; None: plain img2img.
    mask: np.ndarray | None = None


@dataclass(frozen=True)
class GenerationResult:
    images: np.ndarray  # [N, 3, H, W] float32, decoder output in about [-1, 1]


def latent_noise(seeds: Sequence[int], shape: tuple[int, ...], draws: int = 2) -> tuple[np.ndarray, ...]:
    """Per-image (VAE sample noise, first-timestep noise), stacked; image i depends on seeds[i] only. `draws` 3
    adds the masked image's VAE sample noise (a masked request); the first two are the same either way."""
    per_image = [math.draw_inpaint_noise(s, shape) if draws == 3 else math.draw_noise(s, shape) for s in seeds]
    return tuple(np.concatenate([d[k] for d in per_image]) for k in range(draws))


# (pipeline, prompt, negative prompt or None without guidance, guidance on/off, the text-encoder LoRAs: name,
# scale and file version of each): what the text encoder is given.
TextKey = tuple[str, str, str | None, bool, tuple[tuple[str, float, tuple[int, int]], ...]]
DEFAULT_TEXT_CACHE_SIZE = 256
# An entry: SD's hidden states, or SDXL's (hidden states, pooled embeddings).
Embeds = np.ndarray | tuple[np.ndarray, ...]
E = TypeVar("E", np.ndarray, tuple[np.ndarray, ...])


class TextEmbeddingCache:
    """An LRU of text-encoder outputs, shared by the pipelines of a process (`IMAGEN_TEXT_CACHE_SIZE` entries).

    Production traffic repeats prompts and styles; a hit skips the text encoder's Triton call. An entry is the
    whole call's output (`[negative, prompt]` with guidance, `[prompt]` without), stored read-only and used
    as-is, so a hit gives exactly the embeddings of the miss that filled it. `max_entries` 0 disables it (every
    lookup is a miss and nothing is kept). `on_lookup(hit)` is told about every lookup (metrics).
    An SD-1.5-sized entry with guidance is 2 x 77 x 768 float32 = 462 KiB, so 256 entries hold about 115 MiB.
    Concurrent misses of one key each call the encoder; the first to finish fills the entry.
    """

    def __init__(
        self, max_entries: int = DEFAULT_TEXT_CACHE_SIZE, *, on_lookup: Callable[[bool], None] | None = None
    ) -> None:
        if max_entries < 0:
            raise ValueError("text cache size must be 0 (off) or more")
        self.max_entries = max_entries
        self.on_lookup = on_lookup
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[TextKey, Embeds] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: TextKey) -> Embeds | None:
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        else:
            self.misses += 1
        if self.on_lookup is not None:
            self.on_lookup(found is not None)
        return found

    def put(self, key: TextKey, embeds: E) -> E:
        """Keep `embeds` for `key` (made read-only), evicting the least recently used beyond the bound; a key
        already held (a concurrent miss finished first) keeps its entry, which is returned."""
        for array in embeds if isinstance(embeds, tuple) else (embeds,):
            array.setflags(write=False)
        if self.max_entries == 0:
            return embeds
        held = self._entries.get(key)
        if held is not None:
            self._entries.move_to_end(key)
            return cast(E, held)  # one key is always filled by the same pipeline's encoder: same kind
        self._entries[key] = embeds
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return embeds

    async def lookup(self, key: TextKey, encode: Callable[[], Awaitable[E]]) -> E:
        """The cached embeddings of `key`, else `encode()`'s, kept for next time."""
        found = self.get(key)
        if found is not None:
            return cast(E, found)
        return self.put(key, await encode())


async def run_in_chunks(
    engine: Engine,
    model: str,
    feeds: Mapping[str, np.ndarray],
    outputs: Sequence[str],
    max_rows: int | None,
    *,
    priority: int = DEFAULT_PRIORITY,
) -> dict[str, np.ndarray]:
    """`engine.infer`, split along the batch axis into calls of at most `max_rows` rows (Triton refuses more than
    a model's max_batch_size). The chunks go out together, each at the job's `priority`, so Triton's batcher can
    still merge them with other requests' rows, and their outputs are joined in order: the same arrays as one
    call."""
    rows = len(next(iter(feeds.values())))
    if max_rows is None or rows <= max_rows:
        return await engine.infer(model, feeds, outputs, priority=priority)
    starts = range(0, rows, max_rows)
    parts = await asyncio.gather(
        *(
            engine.infer(model, {k: v[s : s + max_rows] for k, v in feeds.items()}, outputs, priority=priority)
            for s in starts
        )
    )
    return {name: np.concatenate([part[name] for part in parts]) for name in outputs}


INVALID_OUTPUT_MESSAGE = "The inference backend returned an invalid result"


def output_problem(array: np.ndarray | None, expected: ExpectedOutput) -> str | None:
    """What is wrong with one output against what it must be, or None when it may be used."""
    if array is None:
        return "missing"
    if array.dtype != expected.dtype:
        return f"dtype {array.dtype}, expected {expected.dtype}"
    shape = expected.shape
    if shape is None:
        ok = array.ndim >= 1 and array.shape[0] == expected.rows
        want = f"{expected.rows} rows"
    else:
        ok = array.ndim == len(shape) and all(e is None or a == e for a, e in zip(array.shape, shape, strict=True))
        want = "[" + ", ".join("*" if e is None else str(e) for e in shape) + "]"
    if not ok:
        return f"shape {list(array.shape)}, expected {want}"
    if expected.finite and not np.all(np.isfinite(array)):
        return "NaN or infinity"
    return None


class CheckedEngine:
    """`engine` whose every answer for `component` is checked against what the manifest and the recipe expect
    (`PipelineManifest.expected_outputs`) before anything uses it: one call at a time, so each chunk of a split
    call is checked against its own rows before the chunks are joined. An answer that is not what was asked for
    raises `BackendError` (502 `backend_error`) naming the model and output; the mismatch itself is logged."""

    def __init__(self, engine: Engine, manifest: PipelineManifest, component: Component) -> None:
        self.engine, self.manifest, self.component = engine, manifest, component

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        *,
        priority: int = DEFAULT_PRIORITY,
    ) -> dict[str, np.ndarray]:
        answer = await self.engine.infer(model, inputs, outputs, priority=priority)
        shapes = {role: tuple(inputs[name].shape) for role, name in self.component.inputs.items() if name in inputs}
        expected = self.manifest.expected_outputs(self.component, shapes)
        role_of = {name: role for role, name in self.component.outputs.items()}
        for name in outputs:
            problem = output_problem(answer.get(name), expected[role_of[name]])
            if problem is not None:
                request_id = current_request_id()
                log.warning("triton model %s answered an unusable %s: %s", model, name, problem)
                raise BackendError(
                    INVALID_OUTPUT_MESSAGE,
                    f"Model '{model}' returned an invalid '{name}' output "
                    f"({f'request {request_id}' if request_id else 'no request id'}; the cause is in the gateway log)",
                )
        return {name: answer[name] for name in outputs}

    async def models_ready(self, models: Sequence[str]) -> bool:
        return await self.engine.models_ready(models)

    async def statistics(self, model: str) -> dict[str, Any]:
        return await self.engine.statistics(model)

    async def close(self) -> None:
        await self.engine.close()


@dataclass(frozen=True)
class Conditioning:
    """The UNet's inputs besides sample and timestep, for the whole (guidance-doubled) batch, by role."""

    inputs: dict[str, np.ndarray]


class Img2ImgPipeline:
    """One served pipeline: its manifest, its tokenizer, the Triton engine it calls, and the text cache it uses
    (None: none, every prompt goes to the text encoder)."""

    def __init__(
        self,
        manifest: PipelineManifest,
        engine: Engine,
        *,
        text_cache: TextEmbeddingCache | None = None,
        loras: LoraRegistry | None = None,
    ) -> None:
        self.manifest = manifest
        self.engine = engine
        self.text_cache = text_cache
        self.loras = loras  # the adapter folder (a model with LoRA slots needs one)
        self.tokenizer: Tokenizer = Tokenizer.from_file(str(manifest.tokenizer_path))
        # One tokenizer per text encoder (SDXL's second pads with "!", not with the end token).
        self.tokenizers = [Tokenizer.from_file(str(t.tokenizer_path)) for t in manifest.texts]
        # diffusers' img2img pipeline rewrites some scheduler settings at construction; serve what it runs.
        self.scheduler_config = math.img2img_scheduler_config(dict(manifest.scheduler), manifest.family)
        make_scheduler(self.scheduler_config)  # fail at start-up, not per request, on an unsupported one
        # Short name -> config of every scheduler this model can run: built once (each choice constructs a
        # scheduler; per request that was ~0.4 ms of event-loop CPU).
        self.scheduler_choices: Mapping[str, Mapping[str, Any]] = scheduler_choices(self.scheduler_config)

    def tokenize(self, texts: Sequence[str], tokenizer: Tokenizer | None = None) -> np.ndarray:
        """CLIP ids padded/truncated to the text window, as diffusers' tokenizer call does."""
        with stage("tokenize"):
            encoded = (tokenizer or self.tokenizer).encode_batch(list(texts))
            return np.array([e.ids for e in encoded], dtype=np.int64)

    async def _run_component(
        self, component: Component, inputs: dict[str, np.ndarray], *, priority: int
    ) -> dict[str, np.ndarray]:
        """One Triton call, or one per chunk of the model's max_batch_size rows when the inputs carry more (a
        guided request of 4 images is 8 UNet rows; a calibrated CPU UNet may take 2); inputs and outputs by
        manifest role. Every answer is checked (`CheckedEngine`: dtype, rows, shape, finite where needed) before
        it is used or cached. `priority` is required here, so no call of a job falls back to the default."""
        feeds = {component.inputs[role]: array for role, array in inputs.items()}
        names = list(component.outputs.values())
        engine = CheckedEngine(self.engine, self.manifest, component)
        out = await run_in_chunks(engine, component.model, feeds, names, component.max_batch_size, priority=priority)
        return {role: out[name] for role, name in component.outputs.items()}

    async def _run(self, component_name: str, inputs: dict[str, np.ndarray], *, priority: int) -> np.ndarray:
        component = getattr(self.manifest, component_name)
        (output,) = (await self._run_component(component, inputs, priority=priority)).values()
        return output

    def lora_feed(
        self, component: Component, name: str, rows: int, loras: Sequence[LoraChoice]
    ) -> dict[str, np.ndarray]:
        """The `loras` input of a call to `component` (named as the export names it), when it takes one: each row
        the request's adapters that adapt it, or none. A file gone or changed since admission fails the job."""
        if LORA_ROLE not in component.inputs:
            return {}
        value = NO_ADAPTER
        if loras:
            with self._adapters_still_usable():
                value = self._registry().rows_for(name, loras)
        return {LORA_ROLE: row_feed(value, rows)}

    def _registry(self) -> LoraRegistry:
        if self.loras is None:
            raise InvalidRequest("LoRA adapters are not served here", "The gateway has no LoRA folder")
        return self.loras

    @contextmanager
    def _adapters_still_usable(self) -> Iterator[None]:
        """A file removed or broken since admission fails the job with its reason (the one translation)."""
        try:
            yield
        except (FileNotFoundError, LoraFileError) as exc:
            raise InvalidRequest(
                "A LoRA adapter of this job cannot be used any more", f"{type(exc).__name__}: {exc}"
            ) from None

    def text_lora_key(self, loras: Sequence[LoraChoice]) -> tuple[tuple[str, float, tuple[int, int]], ...]:
        if not loras:
            return ()
        with self._adapters_still_usable():
            return self._registry().text_key(loras)

    async def encode_prompt(
        self,
        prompt: str,
        negative_prompt: str,
        cfg: bool,
        loras: Sequence[LoraChoice] = (),
        *,
        priority: int = DEFAULT_PRIORITY,
    ) -> np.ndarray:
        """Text-encoder output for `[negative_prompt, prompt]` (guidance) or `[prompt]`, from the cache if held
        (an entry is the same whatever the priority of the job that filled it)."""

        async def encode() -> np.ndarray:
            texts = [negative_prompt, prompt] if cfg else [prompt]
            inputs = {"input_ids": self.tokenize(texts)}
            inputs.update(self.lora_feed(self.manifest.text_encoder, "text_encoder", len(texts), loras))
            return await self._run("text_encoder", inputs, priority=priority)

        if self.text_cache is None:
            return await encode()
        key: TextKey = (self.manifest.name, prompt, negative_prompt if cfg else None, cfg, self.text_lora_key(loras))
        return await self.text_cache.lookup(key, encode)

    async def encode_prompt_sdxl(
        self,
        prompt: str,
        negative_prompt: str,
        cfg: bool,
        sdxl: SdxlConditioning,
        loras: Sequence[LoraChoice] = (),
        *,
        priority: int = DEFAULT_PRIORITY,
    ) -> tuple[np.ndarray, ...]:
        """SDXL's `encode_prompt`: (hidden states [B, 77, sum of widths], pooled [B, width]) for `[negative,
        prompt]` (guidance) or `[prompt]`, from the cache if held. Each encoder's penultimate hidden state,
        concatenated on the feature axis; pooled from the last encoder. Without a negative prompt and with
        `force_zeros_for_empty_prompt` the negative half is zeros, and only the prompt is encoded."""
        zeros = cfg and math.sdxl_negative_is_zeros(negative_prompt, sdxl.force_zeros_for_empty_prompt)

        async def encode() -> tuple[np.ndarray, ...]:
            texts = [prompt] if zeros or not cfg else [negative_prompt, prompt]
            outs = await asyncio.gather(  # the two encoders are independent: one round trip, not two
                *(
                    self._run_component(
                        text.component,
                        {
                            "input_ids": self.tokenize(texts, tokenizer),
                            **self.lora_feed(text.component, text.name, len(texts), loras),
                        },
                        priority=priority,
                    )
                    for text, tokenizer in zip(self.manifest.texts, self.tokenizers, strict=True)
                )
            )
            embeds = np.concatenate([out["hidden_states"] for out in outs], axis=-1)
            pooled = outs[-1]["text_embeds"]
            if zeros:
                return np.concatenate([np.zeros_like(embeds), embeds]), np.concatenate([np.zeros_like(pooled), pooled])
            return embeds, pooled

        if self.text_cache is None:
            return await encode()
        key: TextKey = (self.manifest.name, prompt, negative_prompt if cfg else None, cfg, self.text_lora_key(loras))
        return await self.text_cache.lookup(key, encode)

    async def conditioning(
        self, gen: Generation, cfg: bool, height: int, width: int, *, priority: int = DEFAULT_PRIORITY
    ) -> Conditioning:
        """Step 1 of the recipe: everything the UNet is conditioned on, repeated for the request's images in
        diffusers' order ([uncond x N, cond x N] with guidance)."""
        n = len(gen.seeds)
        sdxl = self.manifest.sdxl
        if sdxl is None:
            embeds = await self.encode_prompt(gen.prompt, gen.negative_prompt, cfg, gen.loras, priority=priority)
            return Conditioning({"encoder_hidden_states": np.repeat(embeds, n, axis=0)})
        hidden, pooled = await self.encode_prompt_sdxl(
            gen.prompt, gen.negative_prompt, cfg, sdxl, gen.loras, priority=priority
        )
        time_ids, negative_ids = math.sdxl_add_time_ids(
            height,
            width,
            requires_aesthetics_score=sdxl.requires_aesthetics_score,
            aesthetic_score=sdxl.aesthetic_score,
            negative_aesthetic_score=sdxl.negative_aesthetic_score,
        )
        ids = np.concatenate([negative_ids, time_ids]) if cfg else time_ids
        return Conditioning(
            {
                "encoder_hidden_states": np.repeat(hidden, n, axis=0),
                "text_embeds": np.repeat(pooled, n, axis=0),
                "time_ids": np.repeat(ids, n, axis=0),
            }
        )

    async def __call__(
        self,
        gen: Generation,
        noise: tuple[np.ndarray, ...] | None = None,
        *,
        on_step: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        priority: int = DEFAULT_PRIORITY,
        before_step: Callable[[], Awaitable[None]] | None = None,
    ) -> GenerationResult:
        """Run the recipe. `noise` overrides the seeded draws (parity tests pass diffusers' torch draws): (VAE
        sample, first timestep), plus the masked image's VAE sample for a masked request.

        With `gen.mask`, diffusers' inpaint pipeline instead: strength 1.0 starts from pure noise; a 4-channel UNet
        gets the image's latents blended back outside the mask after every step; an inpainting (9-channel) UNet
        sees the mask and the masked image's latents beside the latents. Without a mask, the calls and the
        pixels are img2img's, unchanged.

        `on_step(done, total)` reports denoising progress; `should_stop()` is checked before every Triton call,
        so a canceled request sends no further UNet step. Every Triton call goes out at the job's `priority`, so
        Triton's batchers serve a higher-priority job's calls before queued lower ones. `before_step()` is awaited
        at every boundary between the recipe's Triton stages (before the text encoding, the VAE encode, each UNet
        step and the decode), ahead of the stop check: where the caller may hold the job while a higher-priority
        one runs (none of its calls then competes for the backend), and a cancel that arrived meanwhile still
        stops it.
        """

        def check_stop() -> None:
            if should_stop is not None and should_stop():
                raise GenerationCanceled()

        async def boundary() -> None:
            if before_step is not None:
                await before_step()
            check_stop()

        m = self.manifest
        num_images = len(gen.seeds)
        cfg = math.do_classifier_free_guidance(gen.guidance_scale)
        mask = gen.mask
        nine = m.inpainting  # the UNet's sample is [latents, mask, masked-image latents]
        if nine and mask is None:  # admission refuses it first; this guards any other caller
            raise InvalidRequest("Invalid field 'mask'", f"Model '{m.name}' is an inpainting model: send a 'mask'")
        # diffusers inpaint's is_strength_max: pure noise to start, and (9-channel) the image itself not encoded.
        strength_max = mask is not None and gen.strength == 1.0

        await boundary()
        # 1. Encode the prompt (and the negative prompt, in the same call, when guidance needs it): a cache hit
        # skips the tokenizer and the text encoder(s). SDXL adds the pooled text and the size time ids.
        cond = await self.conditioning(gen, cfg, height=gen.image.shape[2], width=gen.image.shape[3], priority=priority)

        # 2. Timesteps: strength skips the start of the schedule, exactly as diffusers' get_timesteps.
        with stage("scheduler"):
            scheduler = make_scheduler(self.scheduler_config if gen.scheduler_config is None else gen.scheduler_config)
            scheduler.set_timesteps(gen.steps)
            timesteps, _ = math.get_img2img_timesteps(scheduler, gen.steps, gen.strength)

        # 3. Prepare latents: one VAE encode shared by all images, then per-image sampling and noising. A
        # 9-channel UNet also needs the masked image (diffusers' `image * (mask < 0.5)`), encoded in the same
        # call (a 2-row call; the masked image alone at strength 1.0, where the image's latents go unused).
        await boundary()
        encodes_image = not (nine and strength_max)
        encode = [gen.image] if encodes_image else []
        if nine and mask is not None:
            encode.append(gen.image * (mask < 0.5))
        params = await self._run("vae_encoder", {"sample": np.concatenate(encode)}, priority=priority)
        latent_shape = (1, m.latent_channels, *params.shape[2:])
        draws = noise if noise is not None else latent_noise(gen.seeds, latent_shape, 2 if mask is None else 3)
        vae_noise, start_noise = draws[0], draws[1]
        image_latents = None
        if encodes_image:
            image_params = np.repeat(params[:1], num_images, axis=0)
            image_latents = math.sample_latents(image_params, vae_noise, m.scaling_factor, m.shift_factor)
        # Below strength 1.0 (and always without a mask) this is img2img's `prepare_initial_latents`.
        latents = math.prepare_inpaint_latents(scheduler, image_latents, start_noise, timesteps[0], strength_max)
        lmask = None if mask is None else math.latent_mask(mask, m.vae_scale_factor)  # diffusers' F.interpolate
        # A 4-channel UNet knows nothing of the mask: after every step the image's latents go back outside it.
        blend = (image_latents, lmask) if image_latents is not None and lmask is not None and not nine else None
        extra = None  # a 9-channel UNet's [mask, masked-image latents], per (guidance-doubled) row
        if nine and lmask is not None:
            masked_params = np.repeat(params[-1:], num_images, axis=0)  # with the third draw: its own VAE sample
            masked_latents = math.sample_latents(masked_params, draws[2], m.scaling_factor, m.shift_factor)
            extra = np.concatenate([np.repeat(lmask, num_images, axis=0), masked_latents], axis=1)
            extra = np.concatenate([extra, extra]) if cfg else extra

        # 4. Denoise, with classifier-free guidance (skipped when guidance_scale <= 1, as diffusers does). Every
        # row names the request's adapters: a batch of rows of several requests runs each row's own.
        step_rng = np.random.Generator(np.random.PCG64([gen.seeds[0], num_images]))
        rows = num_images * (2 if cfg else 1)
        unet_loras = self.lora_feed(m.unet, "unet", rows, gen.loras)
        if on_step is not None:
            on_step(0, len(timesteps))
        for i, t in enumerate(timesteps):
            await boundary()
            with stage("scheduler"):
                model_in = np.concatenate([latents, latents]) if cfg else latents
                model_in = scheduler.scale_model_input(model_in, t)
                if extra is not None:  # the mask and masked-image latents are not scaled (diffusers' order)
                    model_in = np.concatenate([model_in, extra], axis=1)
            noise_pred = await self._run(
                "unet",
                {
                    "sample": model_in.astype(np.float32),
                    "timestep": np.full((model_in.shape[0], 1), t, dtype=np.float32),
                    **cond.inputs,
                    **unet_loras,
                },
                priority=priority,
            )
            with stage("scheduler"):
                if cfg:
                    noise_pred = math.apply_guidance(noise_pred, gen.guidance_scale)
                latents = scheduler.step(noise_pred, t, latents, generator=step_rng)
                if blend is not None:  # the image's latents noised to the next timestep; clean after the last
                    next_t = timesteps[i + 1] if i + 1 < len(timesteps) else None
                    latents = math.blend_unmasked(scheduler, latents, blend[0], start_noise, blend[1], next_t)
            if on_step is not None:
                on_step(i + 1, len(timesteps))

        # 5. Decode.
        await boundary()
        decoded = await self._run(
            "vae_decoder",
            {"latent_sample": math.denormalize_latents_for_decode(latents, m.scaling_factor, m.shift_factor)},
            priority=priority,
        )
        if not np.all(np.isfinite(decoded)):  # the classic fp16 VAE overflow: an error, not arbitrary pixels
            raise BackendError("The model produced an invalid image", "Decoder output contains NaN or infinity")
        return GenerationResult(images=decoded)
