// Grouped GEMMs for sorted MoE rows, as a TensorFlow custom op: an experiment, not
// part of keras_moe. Each expert's rows are multiplied by that expert's matrix with
// Eigen's single-threaded GEMM, and the experts (cut into row or column blocks) run in
// parallel on TensorFlow's intra-op thread pool: the "grouped GEMM" that GPU MoE
// libraries use, here on the CPU. `grouped_gemm.py` builds it and times it against
// TensorFlow's own matmuls.
#include <algorithm>
#include <vector>

#include "Eigen/Core"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace {

using tensorflow::int32;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using RowMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using ConstMatrix = Eigen::Map<const RowMajor>;
using Matrix = Eigen::Map<RowMajor>;

constexpr int64_t kBlock = 128;  // rows (forward) or output columns (weight gradient)

// First row of each expert, and the total, from the per-expert row counts.
std::vector<int64_t> GroupStarts(const Tensor& group_sizes) {
  auto sizes = group_sizes.flat<int32>();
  std::vector<int64_t> starts(sizes.size() + 1, 0);
  for (int64_t e = 0; e < sizes.size(); ++e) starts[e + 1] = starts[e] + sizes(e);
  return starts;
}

class GroupedMatMulOp : public OpKernel {
 public:
  explicit GroupedMatMulOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& rows = context->input(0);     // (n, in), sorted by expert
    const Tensor& kernels = context->input(1);  // (experts, in, out)
    const std::vector<int64_t> starts = GroupStarts(context->input(2));
    const int64_t n = rows.dim_size(0), in = rows.dim_size(1), out = kernels.dim_size(2);
    OP_REQUIRES(context, starts.back() == n,
                tensorflow::errors::InvalidArgument("group_sizes must sum to the rows"));
    Tensor* result = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({n, out}), &result));

    struct Task { int64_t expert, first_row, rows; };
    std::vector<Task> tasks;
    for (int64_t e = 0; e + 1 < static_cast<int64_t>(starts.size()); ++e) {
      for (int64_t r = starts[e]; r < starts[e + 1]; r += kBlock) {
        tasks.push_back({e, r, std::min(kBlock, starts[e + 1] - r)});
      }
    }
    const float* x = rows.flat<float>().data();
    const float* w = kernels.flat<float>().data();
    float* y = result->flat<float>().data();
    auto run = [&](int64_t first, int64_t last) {
      for (int64_t i = first; i < last; ++i) {
        const Task& t = tasks[i];
        Matrix(y + t.first_row * out, t.rows, out).noalias() =
            ConstMatrix(x + t.first_row * in, t.rows, in) *
            ConstMatrix(w + t.expert * in * out, in, out);
      }
    };
    context->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(
        tasks.size(), 2 * kBlock * in * out, run);
  }
};

class GroupedWeightGradOp : public OpKernel {
 public:
  explicit GroupedWeightGradOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& rows = context->input(0);   // (n, in), sorted by expert
    const Tensor& grads = context->input(1);  // (n, out)
    const std::vector<int64_t> starts = GroupStarts(context->input(2));
    const int64_t experts = starts.size() - 1;
    const int64_t in = rows.dim_size(1), out = grads.dim_size(1);
    Tensor* result = nullptr;
    OP_REQUIRES_OK(context,
                   context->allocate_output(0, TensorShape({experts, in, out}), &result));
    const int64_t blocks = (out + kBlock - 1) / kBlock;
    const float* x = rows.flat<float>().data();
    const float* g = grads.flat<float>().data();
    float* dw = result->flat<float>().data();
    auto run = [&](int64_t first, int64_t last) {
      for (int64_t i = first; i < last; ++i) {
        const int64_t e = i / blocks, column = (i % blocks) * kBlock;
        const int64_t width = std::min(kBlock, out - column), n = starts[e + 1] - starts[e];
        auto block = Matrix(dw + e * in * out, in, out).middleCols(column, width);
        if (n == 0) {
          block.setZero();
          continue;
        }
        block.noalias() = ConstMatrix(x + starts[e] * in, n, in).transpose() *
                          ConstMatrix(g + starts[e] * out, n, out).middleCols(column, width);
      }
    };
    context->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(
        experts * blocks, 2 * (starts.back() / std::max<int64_t>(experts, 1)) * in * kBlock,
        run);
  }
};

}  // namespace

REGISTER_OP("KerasMoeGroupedMatMul")
    .Input("rows: float")
    .Input("kernels: float")
    .Input("group_sizes: int32")
    .Output("outputs: float")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->Matrix(c->Dim(c->input(0), 0), c->Dim(c->input(1), 2)));
      return absl::OkStatus();
    });

REGISTER_OP("KerasMoeGroupedWeightGrad")
    .Input("rows: float")
    .Input("grads: float")
    .Input("group_sizes: int32")
    .Output("weight_grads: float")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->MakeShape({c->Dim(c->input(2), 0), c->Dim(c->input(0), 1),
                                     c->Dim(c->input(1), 1)}));
      return absl::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("KerasMoeGroupedMatMul").Device(tensorflow::DEVICE_CPU),
                        GroupedMatMulOp);
REGISTER_KERNEL_BUILDER(Name("KerasMoeGroupedWeightGrad").Device(tensorflow::DEVICE_CPU),
                        GroupedWeightGradOp);
