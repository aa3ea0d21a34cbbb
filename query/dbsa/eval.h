// Accuracy and latency of DBSA and the baselines over a labelled test set.
#ifndef SHOTDB_QUERY_DBSA_EVAL_H_
#define SHOTDB_QUERY_DBSA_EVAL_H_

#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "query/dbsa/dbsa.h"
#include "query/dbsa/demo_file.h"

namespace shotdb {

struct EvalOptions {
  std::vector<Method> methods = {Method::kDbsa};
  AnswerOptions answer;  // method is overridden per method
  // Called after each query: (method, queries done, queries total).
  std::function<void(Method, size_t, size_t)> progress;
};

struct LatencySummary {  // milliseconds
  double mean = 0, p50 = 0, p90 = 0, p99 = 0, max = 0;
};
// Percentiles by linear interpolation between closest ranks (numpy's default).
LatencySummary Summarize(std::vector<double> samples_ms);

// {"select", "load", "gather", "encode", "decode", "total"} in milliseconds.
nlohmann::json TimingToJson(const Timing& timing);

struct MethodResult {
  Method method = Method::kDbsa;
  size_t queries = 0, correct = 0;
  double accuracy = 0;
  LatencySummary latency;    // per query, total
  Timing mean_timing;        // mean of each part
  double setup_seconds = 0;  // FixedICL: prefix encoding; 0 otherwise (the pool build is separate)
  double mean_context_tokens = 0;
  double mean_selected = 0;  // blocks (RetICL: demonstrations) per query
  double budget_bound = 0;   // fraction of queries whose selection the context budget ended
};

struct EvalRecord {
  size_t index = 0;
  Method method = Method::kDbsa;
  std::string expected, predicted;
  double latency_ms = 0;
  uint64_t context_tokens = 0;
  size_t selected = 0;  // blocks (RetICL: demonstrations)
  bool budget_bound = false;
};

struct EvalReport {
  std::vector<MethodResult> results;
  std::vector<EvalRecord> records;
  std::string ToTable() const;  // aligned text, latency ratios against RetICL when it ran
  std::string ToJson() const;
};

// Runs every method over every test example (queries are the texts, expected answers the labels).
Result<EvalReport> RunEval(DbsaSession* session, const std::vector<LabeledText>& tests,
                           const EvalOptions& options);

}  // namespace shotdb

#endif  // SHOTDB_QUERY_DBSA_EVAL_H_
