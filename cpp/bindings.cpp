// The Python extension module llama_mm._C. Loading it registers the torch.ops.llama_mm.* operators
// (op_library.cpp, cuda/*.cu); pybind11 bindings for stateful objects go here.
#include <torch/extension.h>
#include <pybind11/functional.h>
#include <pybind11/stl.h>
#include <ATen/CPUGeneratorImpl.h>

#include "engine.h"
#include "scheduler.h"
#include "sampling.h"
#include "widened_linear.h"

namespace {

// Scheduler events as Python tuples: (id, token | -1, logprob | None, [(id, logprob)] | None, finish | None,
// error | None, prompt_tokens, completion_tokens).
py::list events_to_python(const std::vector<llama_mm::BatchEvent>& events) {
  py::list out;
  for (const auto& e : events) {
    py::object lp = py::none(), top = py::none(), fin = py::none(), err = py::none();
    if (e.has_logprobs) {
      lp = py::float_(e.logprob);
      top = py::cast(e.top);
    }
    if (!e.finish.empty()) fin = py::str(e.finish);
    if (!e.error.empty()) err = py::str(e.error);
    out.append(py::make_tuple(e.id, e.token, lp, top, fin, err, e.prompt_tokens, e.completion_tokens));
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "llama_mm native kernels; the ops are torch.ops.llama_mm.*";
#ifdef LLAMA_MM_WITH_CUDA
  m.attr("cuda_kernels") = true;
#else
  m.attr("cuda_kernels") = false;
#endif

  py::class_<llama_mm::SamplingParams>(m, "SamplingParams")
      .def(py::init<>())
      .def_readwrite("do_sample", &llama_mm::SamplingParams::do_sample)
      .def_readwrite("temperature", &llama_mm::SamplingParams::temperature)
      .def_readwrite("top_k", &llama_mm::SamplingParams::top_k)
      .def_readwrite("top_p", &llama_mm::SamplingParams::top_p)
      .def_readwrite("min_p", &llama_mm::SamplingParams::min_p)
      .def_readwrite("repetition_penalty", &llama_mm::SamplingParams::repetition_penalty)
      .def_readwrite("seed", &llama_mm::SamplingParams::seed);

  m.def("widened_linear_applies", &llama_mm::cpu::widened_linear_applies,
        "Whether x @ weight^T runs faster widened (torch.ops.llama_mm.widened_linear): CPU tensors of one 16-bit "
        "dtype on a CPU without arithmetic in that dtype",
        py::arg("x"), py::arg("weight"));
  m.def("sampling_probs", &llama_mm::sampling_probs, "logits [B, V] -> probabilities after the warpers",
        py::arg("logits"), py::arg("params"));
  m.def("sample_next",
        [](const at::Tensor& logits, const std::optional<at::Tensor>& seen, const llama_mm::SamplingParams& p,
           int64_t seed, int64_t steps) {
          // `steps` draws with one generator (tests: the stream matches torch.Generator().manual_seed(seed)).
          p.validate();
          auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed));
          std::vector<at::Tensor> out;
          for (int64_t i = 0; i < steps; ++i) out.push_back(llama_mm::sample_next(logits, seen.value_or(at::Tensor()), p, gen));
          return at::stack(out, 0);
        },
        py::arg("logits"), py::arg("seen"), py::arg("params"), py::arg("seed"), py::arg("steps") = 1);

  py::class_<llama_mm::Engine>(m, "Engine")
      .def(py::init([](const std::unordered_map<std::string, at::Tensor>& weights, int64_t hidden_size,
                       int64_t num_layers, int64_t num_heads, int64_t num_kv_heads, int64_t vocab_size,
                       double rms_norm_eps, int64_t max_positions, std::vector<int64_t> cross_layers,
                       at::Tensor inv_freq, bool int8_activations) {
             llama_mm::EngineConfig cfg;
             cfg.hidden_size = hidden_size;
             cfg.num_layers = num_layers;
             cfg.num_heads = num_heads;
             cfg.num_kv_heads = num_kv_heads;
             cfg.vocab_size = vocab_size;
             cfg.rms_norm_eps = rms_norm_eps;
             cfg.max_positions = max_positions;
             cfg.cross_attention_layers = std::move(cross_layers);
             cfg.int8_activations = int8_activations;
             return std::make_unique<llama_mm::Engine>(weights, cfg, inv_freq);
           }),
           py::arg("weights"), py::arg("hidden_size"), py::arg("num_layers"), py::arg("num_heads"),
           py::arg("num_kv_heads"), py::arg("vocab_size"), py::arg("rms_norm_eps"), py::arg("max_positions"),
           py::arg("cross_attention_layers"), py::arg("inv_freq"), py::arg("int8_activations") = false)
      .def("generate",
           [](llama_mm::Engine& e, const at::Tensor& ids, const at::Tensor& mask,
              const std::optional<at::Tensor>& image_kv, const std::optional<at::Tensor>& cross,
              const std::optional<at::Tensor>& rows, int64_t max_new_tokens, const llama_mm::SamplingParams& sp,
              const std::vector<int64_t>& stop_ids, int64_t pad_id, const std::optional<py::function>& on_step) {
             llama_mm::StepCallback cb;
             if (on_step) {
               // Called from the loop without the GIL: take it only for the Python call.
               py::function f = *on_step;
               cb = [f](const at::Tensor& tokens) {
                 py::gil_scoped_acquire gil;
                 return f(tokens).cast<bool>();
               };
             }
             py::gil_scoped_release release;
             auto out = e.generate(ids, mask, image_kv, cross, rows, max_new_tokens, sp, stop_ids, pad_id, cb);
             {
               py::gil_scoped_acquire gil;
               cb = nullptr;  // drop the Python reference with the GIL held
             }
             return out;
           },
           "Prefill + the decode loop (GIL released). Returns the new ids [B, N].", py::arg("input_ids"),
           py::arg("attention_mask"), py::arg("image_kv"), py::arg("cross_mask"), py::arg("row_mask"),
           py::arg("max_new_tokens"), py::arg("params"), py::arg("stop_ids"), py::arg("pad_id"),
           py::arg("on_step") = py::none())
      .def("start", &llama_mm::Engine::start, py::call_guard<py::gil_scoped_release>(), py::arg("input_ids"),
           py::arg("attention_mask"), py::arg("image_kv"), py::arg("cross_mask"), py::arg("row_mask"),
           py::arg("max_new_tokens"))
      .def("step", &llama_mm::Engine::step, py::call_guard<py::gil_scoped_release>(), py::arg("tokens"))
      .def("image_kv",
           [](const llama_mm::Engine& e, const at::Tensor& vision_states) {
             return e.weights()->image_kv(vision_states);
           },
           py::call_guard<py::gil_scoped_release>(),
           "Projected vision states [B, S, C] -> every cross layer's K/V [L, 2, B, Hkv, S, D] (GIL released)",
           py::arg("vision_states"));

  // Continuous batching over an engine's weights; one thread drives it (python/llama_mm/batching.py).
  py::class_<llama_mm::Scheduler>(m, "Scheduler")
      .def(py::init([](const llama_mm::Engine& engine, int64_t max_batch, double kv_cache_mb, int64_t block_size,
                       int64_t prefill_chunk) {
             llama_mm::SchedulerConfig cfg;
             cfg.max_batch = max_batch;
             cfg.kv_cache_mb = kv_cache_mb;
             cfg.block_size = block_size;
             cfg.prefill_chunk = prefill_chunk;
             return std::make_unique<llama_mm::Scheduler>(engine.weights(), cfg);
           }),
           py::arg("engine"), py::arg("max_batch"), py::arg("kv_cache_mb"), py::arg("block_size"),
           py::arg("prefill_chunk"))
      .def("max_new_tokens_fitting", &llama_mm::Scheduler::max_new_tokens_fitting,
           "The most new tokens a request of these sizes can be given (the context and the whole KV pool)",
           py::arg("prompt_tokens"), py::arg("image_tokens"))
      .def("fit_error", &llama_mm::Scheduler::fit_error, "Why a request of these sizes can never run ('' if it can)",
           py::arg("prompt_tokens"), py::arg("max_new_tokens"), py::arg("image_tokens"))
      .def("add",
           [](llama_mm::Scheduler& s, int64_t id, const at::Tensor& ids, const std::optional<at::Tensor>& image_kv,
              const std::optional<at::Tensor>& cross, const std::optional<at::Tensor>& rows, int64_t max_new_tokens,
              const llama_mm::SamplingParams& sp, std::vector<int64_t> stop_ids, int64_t logprobs,
              bool image_kv_shared) {
             llama_mm::BatchRequest r;
             r.id = id;
             r.input_ids = ids;
             r.image_kv = image_kv.value_or(at::Tensor());
             r.cross_mask = cross.value_or(at::Tensor());
             r.row_mask = rows.value_or(at::Tensor());
             r.max_new_tokens = max_new_tokens;
             r.sampling = sp;
             r.stop_ids = std::move(stop_ids);
             r.logprobs = logprobs;
             r.image_kv_shared = image_kv_shared;
             s.add(std::move(r));
           },
           "Queue a request: input_ids [T] int64; image_kv [L, 2, 1, Hkv, S, D] (Engine.image_kv), cross_mask "
           "[1, 1, T, S], row_mask [1, T, 1] or None; image_kv_shared: image_kv is also held elsewhere (the image "
           "cache), so the decode rows read their keys in place", py::arg("id"), py::arg("input_ids"),
           py::arg("image_kv"), py::arg("cross_mask"), py::arg("row_mask"), py::arg("max_new_tokens"),
           py::arg("params"), py::arg("stop_ids"), py::arg("logprobs"), py::arg("image_kv_shared") = false)
      .def("cancel", [](llama_mm::Scheduler& s, int64_t id) { return events_to_python(s.cancel(id)); },
           py::arg("id"))
      .def("abort_all",
           [](llama_mm::Scheduler& s, const std::string& reason, const std::string& error) {
             return events_to_python(s.abort_all(reason, error));
           },
           py::arg("reason"), py::arg("error"))
      .def("step",
           [](llama_mm::Scheduler& s) {
             std::vector<llama_mm::BatchEvent> events;
             {
               py::gil_scoped_release release;
               events = s.step();
             }
             return events_to_python(events);
           },
           "One step (GIL released): its events as tuples (id, token, logprob, top, finish, error, prompt_tokens, "
           "completion_tokens)")
      .def_property_readonly("has_work", &llama_mm::Scheduler::has_work)
      .def_property_readonly("running", &llama_mm::Scheduler::running)
      .def_property_readonly("waiting", &llama_mm::Scheduler::waiting)
      .def_property_readonly("waiting_for_blocks", &llama_mm::Scheduler::waiting_for_blocks)
      .def_property_readonly("kv_blocks_used", [](const llama_mm::Scheduler& s) { return s.cache().used_blocks(); })
      .def_property_readonly("kv_blocks_total", [](const llama_mm::Scheduler& s) { return s.cache().num_blocks(); })
      .def_property_readonly("kv_block_size", [](const llama_mm::Scheduler& s) { return s.cache().block_size(); });
}
