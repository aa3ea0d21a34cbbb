#include "query/dbsa/eval.h"

#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>

namespace shotdb {

LatencySummary Summarize(std::vector<double> s) {
  LatencySummary out;
  if (s.empty()) return out;
  std::sort(s.begin(), s.end());
  auto pct = [&](double p) {
    const double rank = p / 100.0 * static_cast<double>(s.size() - 1);
    const size_t lo = static_cast<size_t>(rank);
    const size_t hi = std::min(lo + 1, s.size() - 1);
    return s[lo] + (s[hi] - s[lo]) * (rank - static_cast<double>(lo));
  };
  double sum = 0;
  for (double v : s) sum += v;
  out.mean = sum / static_cast<double>(s.size());
  out.p50 = pct(50);
  out.p90 = pct(90);
  out.p99 = pct(99);
  out.max = s.back();
  return out;
}

Result<EvalReport> RunEval(DbsaSession* session, const std::vector<LabeledText>& tests,
                           const EvalOptions& options) {
  EvalReport report;
  for (Method method : options.methods) {
    AnswerOptions answer_options = options.answer;
    answer_options.method = method;
    answer_options.free_text = false;
    MethodResult result;
    result.method = method;
    std::vector<double> latencies;
    double context_tokens = 0;
    for (size_t i = 0; i < tests.size(); ++i) {
      auto answer = session->Ask(tests[i].text, answer_options);
      if (!answer.ok()) {
        return answer.status().WithContext(std::string(MethodName(method)) + " query " +
                                           std::to_string(i + 1));
      }
      // FixedICL's one-time prefix encoding is setup, not per-query latency.
      const double latency =
          answer->timing.total - (method == Method::kFixedIcl ? answer->timing.encode : 0);
      latencies.push_back(latency);
      context_tokens += static_cast<double>(answer->context_tokens);
      const size_t selected =
          method == Method::kRetIcl ? answer->demos.size() : answer->blocks.size();
      result.mean_selected += static_cast<double>(selected);
      result.budget_bound += answer->budget_bound ? 1.0 : 0.0;
      Timing& t = result.mean_timing;
      t.select += answer->timing.select;
      t.load += answer->timing.load;
      t.gather += answer->timing.gather;
      t.encode += method == Method::kFixedIcl ? 0 : answer->timing.encode;
      t.decode += answer->timing.decode;
      t.total += latency;
      const bool correct = answer->label == tests[i].label;
      result.correct += correct;
      report.records.push_back({i, method, tests[i].label, answer->label, latency,
                                answer->context_tokens, selected, answer->budget_bound});
      if (options.progress) options.progress(method, i + 1, tests.size());
    }
    result.queries = tests.size();
    if (!tests.empty()) {
      const double n = static_cast<double>(tests.size());
      result.accuracy = static_cast<double>(result.correct) / n;
      result.mean_context_tokens = context_tokens / n;
      result.mean_selected /= n;
      result.budget_bound /= n;
      Timing& t = result.mean_timing;
      t.select /= n;
      t.load /= n;
      t.gather /= n;
      t.encode /= n;
      t.decode /= n;
      t.total /= n;
    }
    result.latency = Summarize(latencies);
    if (method == Method::kFixedIcl) result.setup_seconds = session->fixed_prefix_seconds();
    report.results.push_back(result);
  }
  return report;
}

std::string EvalReport::ToTable() const {
  const MethodResult* reticl = nullptr;
  for (const auto& r : results) {
    if (r.method == Method::kRetIcl) reticl = &r;
  }
  std::string out;
  char line[256];
  std::snprintf(line, sizeof line, "%-13s %7s %9s %9s %9s %9s %10s %8s %8s %7s %8s\n", "method",
                "queries", "accuracy", "p50 ms", "p90 ms", "mean ms", "vs RetICL", "ctx tok",
                "selected", "bound", "setup s");
  out += line;
  for (const auto& r : results) {
    char ratio[32] = "-";
    if (reticl && reticl->latency.mean > 0) {
      std::snprintf(ratio, sizeof ratio, "%.3fx", r.latency.mean / reticl->latency.mean);
    }
    std::snprintf(line, sizeof line,
                  "%-13s %7zu %9.4f %9.1f %9.1f %9.1f %10s %8.0f %8.1f %6.0f%% %8.2f\n",
                  std::string(MethodName(r.method)).c_str(), r.queries, r.accuracy, r.latency.p50,
                  r.latency.p90, r.latency.mean, ratio, r.mean_context_tokens, r.mean_selected,
                  100.0 * r.budget_bound, r.setup_seconds);
    out += line;
  }
  out +=
      "selected: blocks per query (reticl: demonstrations); bound: queries whose selection the "
      "context budget ended\n";
  return out;
}

nlohmann::json TimingToJson(const Timing& t) {
  return {{"select", t.select},       {"load", t.load},     {"gather", t.gather},
          {"encode", t.encode},       {"decode", t.decode}, {"total", t.total},
          {"attention", t.attention}, {"mlp", t.mlp},       {"sampling", t.sampling}};
}

std::string EvalReport::ToJson() const {
  nlohmann::json j;
  j["results"] = nlohmann::json::array();
  for (const auto& r : results) {
    j["results"].push_back({
        {"method", MethodName(r.method)},
        {"queries", r.queries},
        {"correct", r.correct},
        {"accuracy", r.accuracy},
        {"latency_ms",
         {{"mean", r.latency.mean},
          {"p50", r.latency.p50},
          {"p90", r.latency.p90},
          {"p99", r.latency.p99},
          {"max", r.latency.max}}},
        {"mean_timing_ms", TimingToJson(r.mean_timing)},
        {"setup_seconds", r.setup_seconds},
        {"mean_context_tokens", r.mean_context_tokens},
        {"mean_selected", r.mean_selected},
        {"budget_bound_fraction", r.budget_bound},
    });
  }
  j["records"] = nlohmann::json::array();
  for (const auto& rec : records) {
    j["records"].push_back({{"index", rec.index},
                            {"method", MethodName(rec.method)},
                            {"expected", rec.expected},
                            {"predicted", rec.predicted},
                            {"latency_ms", rec.latency_ms},
                            {"context_tokens", rec.context_tokens},
                            {"selected", rec.selected},
                            {"budget_bound", rec.budget_bound}});
  }
  return j.dump(2);
}

}  // namespace shotdb
