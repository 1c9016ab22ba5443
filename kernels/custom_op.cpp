// Host shim: an autograd node whose backward is a Rust function, so that a fused kernel with its
// own hand-written backward (src/kernels/*.rs) can sit inside a graph that autograd
// differentiates (Gemma 3n's checkpointed recomputation). Not a kernel. Built by build.rs
// whenever LIBTORCH is set (it needs libtorch's headers only, no CUDA).
//
// It follows what libtorch's generated VariableType code does for a built-in op: the outputs
// are computed first without a graph (by the Rust caller), then a Node is created whose next
// edges are the inputs' gradient edges (`collect_next_edges`) and each output gets the node as
// its grad_fn (`set_history`). The node's `apply` hands the output gradients (zeros for outputs
// that received none) to the Rust callback, which returns one gradient per input (or none).
// The callback's state is released after the one backward it serves (as a node that does not
// retain its graph releases its saved variables) or when the node is destroyed unused.
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>

#include <cstdio>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

// Also `tuner_backward`: autograd's backward from `roots` with the given upstream gradients, as
// `torch.autograd.backward(roots, grads)` does (tch binds only a scalar root's backward, which
// made the checkpointed recomputation write `(y · dy).sum()` and pay for that product, its sum
// and the sum's backward on every layer).
//
// Rust callback: output gradients in (new references the callee owns), input gradients out (new
// tensors whose ownership passes here, or null for none). Returns 0, or non-zero with a message
// written to err (at most err_len bytes, NUL-terminated).
typedef int (*tuner_backward_fn)(void* state, at::Tensor** grads, int n_grads, at::Tensor** out, int n_out, char* err,
                                 int err_len);
// Rust callback: release the state (called once, from backward or the node's destructor).
typedef void (*tuner_drop_fn)(void* state);

namespace {

struct RustNode : public torch::autograd::Node {
  RustNode(std::string name, void* state, tuner_backward_fn bwd, tuner_drop_fn drop, int n_inputs)
      : name_(std::move(name)), state_(state), bwd_(bwd), drop_(drop), n_inputs_(n_inputs) {}

  ~RustNode() override { release(); }

  std::string name() const override { return name_; }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (state_ == nullptr) {
      throw std::runtime_error(name_ + ": backward through this graph a second time (its state is already released)");
    }
    std::vector<at::Tensor*> in(grads.size());
    for (size_t i = 0; i < grads.size(); i++) {
      in[i] = new at::Tensor(grads[i].defined() ? grads[i] : input_metadata(i).zeros_like());
    }
    std::vector<at::Tensor*> out(n_inputs_, nullptr);
    char err[1024] = {0};
    const int rc = bwd_(state_, in.data(), static_cast<int>(in.size()), out.data(), n_inputs_, err, sizeof(err));
    release();
    torch::autograd::variable_list result(n_inputs_);
    for (int i = 0; i < n_inputs_; i++) {
      if (out[i] != nullptr) {
        result[i] = std::move(*out[i]);
        delete out[i];
      }
    }
    if (rc != 0) {
      throw std::runtime_error(name_ + " backward: " + std::string(err));
    }
    return result;
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    release();
  }

 private:
  void release() {
    if (state_ != nullptr) {
      drop_(state_);
      state_ = nullptr;
    }
  }

  std::string name_;
  void* state_;
  tuner_backward_fn bwd_;
  tuner_drop_fn drop_;
  int n_inputs_;
  std::mutex mutex_;
};

}  // namespace

// Attach a RustNode named `name` as the grad_fn of `outputs` (computed by the caller without a
// graph), its next edges the gradient edges of `inputs`. When grad mode is off or no input
// requires a gradient, nothing is attached and `state` is dropped at once. Returns 1 when a node
// was attached, 0 when not, -1 on error (message in err; `state` dropped).
extern "C" int tuner_custom_op(const char* name, at::Tensor** inputs, int n_inputs, at::Tensor** outputs,
                               int n_outputs, void* state, tuner_backward_fn bwd, tuner_drop_fn drop, char* err,
                               int err_len) {
  bool owned = false;  // whether a node owns `state` (and drops it)
  try {
    torch::autograd::variable_list ins;
    for (int i = 0; i < n_inputs; i++) ins.push_back(*inputs[i]);
    if (!torch::autograd::compute_requires_grad(ins)) {
      drop(state);
      return 0;
    }
    auto node = std::shared_ptr<RustNode>(new RustNode(name, state, bwd, drop, n_inputs), torch::autograd::deleteNode);
    owned = true;
    node->set_next_edges(torch::autograd::collect_next_edges(ins));
    for (int i = 0; i < n_outputs; i++) torch::autograd::set_history(*outputs[i], node);
    return 1;
  } catch (const std::exception& e) {
    if (!owned) drop(state);
    snprintf(err, err_len, "%s", e.what());
    return -1;
  }
}

// torch.autograd.backward(roots, grads): accumulate into the leaves' .grad, free the graph.
// Returns 0, or -1 with the message in err.
extern "C" int tuner_backward(at::Tensor** roots, at::Tensor** grads, int n, char* err, int err_len) {
  try {
    torch::autograd::variable_list rs, gs;
    for (int i = 0; i < n; i++) {
      rs.push_back(*roots[i]);
      gs.push_back(*grads[i]);
    }
    torch::autograd::backward(rs, gs, /*retain_graph=*/false, /*create_graph=*/false);
    return 0;
  } catch (const std::exception& e) {
    snprintf(err, err_len, "%s", e.what());
    return -1;
  }
}
