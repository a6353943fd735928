// Registers the CPU primitives as torch.ops.bnorder_cpu.* (fake implementations live in
// fused/_cpp.py).
#include "primitives.h"

TORCH_LIBRARY(bnorder_cpu, m) {
  m.def("stats(Tensor t, int relu_mode, bool exact=False) -> (Tensor mean, Tensor var)");
  m.def("apply(Tensor t, Tensor mean, Tensor scale, Tensor shift, int relu_mode) -> Tensor");
  m.def("backward_reduce(Tensor g, Tensor t, Tensor mean, Tensor scale, Tensor shift, "
        "int relu_mode) -> (Tensor sum_g, Tensor sum_gt)");
  m.def("backward_apply(Tensor g, Tensor t, Tensor mean, Tensor scale, Tensor shift, "
        "Tensor k1, Tensor k2, Tensor k3, int relu_mode) -> Tensor");
  m.def("add_map_relu(Tensor z, Tensor map, bool relu) -> Tensor");
  m.def("relu_grad_batch_sum(Tensor grad, Tensor out) -> (Tensor grad_z, Tensor batch_sum)");
  m.def("coefficients(Tensor? mean, Tensor? var, Tensor? gamma, Tensor? beta, float eps, "
        "int norm, int channels, ScalarType acc) -> (Tensor scale, Tensor shift, "
        "Tensor mean_c, Tensor rstd)");
  m.def("norm_forward(Tensor t, Tensor? gamma, Tensor? beta, Tensor? mean_in, Tensor? var_in, "
        "float eps, int norm, int relu_mode, bool apply) -> (Tensor out, Tensor mean, "
        "Tensor var, Tensor scale, Tensor shift)");
  m.def("norm_backward(Tensor g, Tensor t, Tensor? mean, Tensor? var, Tensor? gamma, "
        "Tensor? beta, float eps, int norm, int relu_mode, bool batch_stats, "
        "bool input_grad) -> (Tensor dt, Tensor dgamma, Tensor dbeta)");
  m.def("fold_forward(Tensor weight, Tensor scale, Tensor shift, int[] in_hw, int[] out_hw, "
        "int[] stride, int[] padding, int[] dilation, int groups) -> (Tensor scaled_weight, "
        "Tensor border_map)");
  m.def("fold_backward(Tensor weight, Tensor wgrad, Tensor grad_sum, Tensor scale, "
        "Tensor shift, int[] in_hw, int[] stride, int[] padding, int[] dilation, "
        "int groups) -> Tensor");
  m.def("fold_exact(Tensor mean, Tensor var, float eps, float limit) -> bool");
  m.def("update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, "
        "Tensor var, int count, float momentum) -> ()");
}

TORCH_LIBRARY_IMPL(bnorder_cpu, CPU, m) {
  m.impl("stats", &bnorder::stats);
  m.impl("apply", &bnorder::apply);
  m.impl("backward_reduce", &bnorder::backward_reduce);
  m.impl("backward_apply", &bnorder::backward_apply);
  m.impl("add_map_relu", &bnorder::add_map_relu);
  m.impl("relu_grad_batch_sum", &bnorder::relu_grad_batch_sum);
  m.impl("norm_forward", &bnorder::norm_forward);
  m.impl("norm_backward", &bnorder::norm_backward);
  m.impl("coefficients", &bnorder::coefficients);
  m.impl("update_running_stats", &bnorder::update_running_stats);
  m.impl("fold_forward", &bnorder::fold_forward);
  m.impl("fold_backward", &bnorder::fold_backward);
  m.impl("fold_exact", &bnorder::fold_exact);
}

// An importable Python module: `from fused import _C` loads the library and runs the
// registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "bnorder CPU kernels (registered as torch.ops.bnorder_cpu)";
  // An autograd node, so a plain function rather than an op: eager calls only (_conv_then_norm).
  m.def("conv_norm_train", &bnorder::conv_norm_train,
        "conv -> norm with batch statistics, forward and backward in C++: [out, mean, var]");
  m.def("norm_conv_train", &bnorder::norm_conv_train,
        "norm -> conv (bn-conv-relu) with batch statistics in C++: [out, mean, var]");
}
