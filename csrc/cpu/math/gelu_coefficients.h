// Coefficients of the GELU (exact, erf form) shared by every build: the portable one (gelu.h) and
// the AVX2 / AVX-512 ones (kernels_avx2.cpp, kernels_avx512.cpp). Data only, no code: safe to
// include from an ISA translation unit (see the ODR rule in dispatch.h).
//
// gelu(v) = 0.5 v (1 + erf(v / sqrt 2)), with erf by a rational approximation fitted for this
// library: with x = clamp(v / (4 sqrt 2), -1, 1) and s = x^2,
//   erf(v / sqrt 2) ~ x P(s) / Q(s),  P of degree 6, Q of degree 5 (Q(0) = 1),
// a near-minimax fit of erf on [0, 4] (error 5e-9 in exact arithmetic; float32 evaluation with
// FMAs: at most 3.2e-7 against erf, about 5 ulp of 1). Outside |v / sqrt 2| <= 4, erf is +-1 to
// within 1.5e-8: the clamped x = +-1 gives exactly +-1 (P6 was nudged by 36 ulp so that x P(1) /
// Q(1) rounds to 1; the portable version selects +-1 explicitly), so gelu(v) = v for large v and
// exactly 0 for large negative v, as in PyTorch. NaN propagates (the clamps keep a NaN operand).
// Cost: 12 FMAs, one division and 6 other operations per vector, about half of an erf built on
// exp (Abramowitz & Stegun 7.1.26, which this replaced: it was two fifths of the depthwise conv's
// time in the clustering head). The division is exact IEEE, so the bits do not depend on the
// CPU vendor (the approximate reciprocal vrcpps does).
#pragma once

namespace paca_kernels::cpu {

// Namespace-scope constexpr variables have internal linkage: each TU has its own (data only).
constexpr float kGeluScale = 0.17677669529663688f;  // 1 / (4 sqrt 2)
constexpr float kGeluP[7] = {4.513516902923584f,  11.735678672790527f, 55.687477111816406f,
                             62.475337982177734f, 102.60752868652344f, 21.178483963012695f,
                             -1.0047216415405273f};
constexpr float kGeluQ[6] = {1.0f, 7.933460235595703f, 29.04918098449707f, 63.214317321777344f,
                             86.22904968261719f, 69.76728820800781f};

}  // namespace paca_kernels::cpu
