// qbrokerctl: the command line for qbrokerd. Every API route is a subcommand (ctl/cli.cpp);
// replies are tables for people or the API's JSON with --json; long jobs show a progress bar on
// a terminal; the exit status says what kind of failure happened (qbrokerctl --help).
#include <unistd.h>

#include <boost/json.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include "ctl/cli.hpp"
#include "ctl/client.hpp"
#include "ctl/complete.hpp"
#include "ctl/manual.hpp"
#include "ctl/render.hpp"
#include "ctl/top.hpp"

namespace json = boost::json;
using Clock = std::chrono::steady_clock;

namespace {

constexpr int kUsage = 2;
constexpr int kUnreachable = 8;
constexpr int kTimedOut = 7;
constexpr int kInternal = 1;

int transport_failure(const qbctl::TransportError& e, bool as_json) {
  if (as_json) {
    json::object err{{"code", e.connect_failed ? "unreachable"
                              : e.timed_out    ? "timeout"
                                               : "transport"},
                     {"message", e.message}};
    std::cout << json::serialize(json::object{{"error", err}}) << "\n";
  }
  std::cerr << "qbrokerctl: " << e.message << "\n";
  return e.connect_failed ? kUnreachable : e.timed_out ? kTimedOut : kInternal;
}

int events(const qbctl::GlobalOptions& g, const qbctl::Invocation& inv) {
  long seen = 0;
  auto result = qbctl::follow(
      g.socket, inv.target, std::chrono::milliseconds(0), [&](const qbctl::SseEvent& ev) {
        if (g.json) {
          std::cout << json::serialize(ev.data) << std::endl;
        } else {
          std::cout << qbctl::render_event(ev.kind, ev.data) << std::flush;
        }
        ++seen;
        if (ev.kind == "dropped") {
          std::cerr << "qbrokerctl: events were dropped: this client fell behind\n";
          return false;
        }
        return inv.events_count < 0 || seen < inv.events_count;
      });
  if (auto* e = std::get_if<qbctl::TransportError>(&result)) return transport_failure(*e, g.json);
  auto& r = std::get<qbctl::Response>(result);
  if (r.status != 200) {
    std::error_code ec;
    json::value body = json::parse(r.body, ec);
    if (g.json) std::cout << r.body;
    std::cerr << qbctl::render_error(r.status, body);
    return qbctl::exit_code(r.status);
  }
  return 0;
}

// The reply of a finished request, printed as --json asks, and the exit status it means.
int answer(const qbctl::GlobalOptions& g, const qbctl::Invocation& inv, const qbctl::Response& r) {
  std::error_code ec;
  json::value body = json::parse(r.body, ec);
  auto raw = [&] { std::cout << r.body << (r.body.empty() || r.body.back() != '\n' ? "\n" : ""); };
  if (r.status >= 300) {
    if (g.json) raw();
    std::cerr << qbctl::render_error(r.status, body);
    return qbctl::exit_code(r.status);
  }
  if (g.json || inv.view == qbctl::View::text) {
    raw();
    return 0;
  }
  if (ec) {
    std::cerr << "qbrokerctl: the reply is not JSON: " << ec.message() << "\n";
    return kInternal;
  }
  std::cout << qbctl::render(inv, body);
  return 0;
}

// A long job's progress, drawn on stderr from the domain's "progress" job events while the
// request is in flight.
class ProgressBar {
 public:
  explicit ProgressBar(std::string job) : job_(std::move(job)) {}

  bool on_event(const qbctl::SseEvent& ev) {
    if (!ev.data.is_object()) return true;  // not an event of ours
    const auto& d = ev.data.get_object();
    auto name = d.find("name");
    auto data = d.find("data");
    if (ev.kind != "job" || name == d.end() || name->value() != "progress" || data == d.end() ||
        !data->value().is_object()) {
      return true;
    }
    const auto& o = data->value().get_object();
    if (auto j = o.find("job"); j != o.end() && j->value() != job_.c_str()) return true;
    if (auto f = o.find("fraction"); f != o.end() && f->value().is_number()) {
      boost::system::error_code ec;
      const double v = f->value().to_number<double>(ec);
      if (!ec) fraction_ = v;
    }
    if (auto ph = o.find("phase"); ph != o.end() && ph->value().is_string()) {
      phase_ = std::string(ph->value().get_string());
    }
    // A save or restore also says how much has gone through and how fast.
    auto bytes = o.find("bytes");
    auto rate = o.find("rate");
    if (bytes != o.end() && bytes->value().is_number() && rate != o.end() && rate->value().is_number()) {
      boost::system::error_code ec;
      const double mib = bytes->value().to_number<double>(ec) / (1 << 20);
      const double per_s = rate->value().to_number<double>(ec) / (1 << 20);
      char text[64];
      std::snprintf(text, sizeof text, " %.1f MiB, %.0f MiB/s", mib, per_s);
      if (!ec) phase_ += text;
    }
    draw();
    return true;
  }

  void draw() {
    double secs = std::chrono::duration<double>(Clock::now() - start_).count();
    std::cerr << "\r" << qbctl::progress_line(fraction_, phase_, secs, ticks_++) << "\x1b[K"
              << std::flush;
  }

  void clear() { std::cerr << "\r\x1b[K" << std::flush; }

 private:
  std::string job_;
  double fraction_ = -1;
  std::string phase_;
  int ticks_ = 0;
  Clock::time_point start_ = Clock::now();
};

// One request; a long job shows its progress on a terminal, from the domain's events.
int request(const qbctl::GlobalOptions& g, const qbctl::Invocation& inv) {
  bool show = !inv.progress_job.empty() && g.progress && !g.json && ::isatty(STDERR_FILENO) == 1;
  std::optional<ProgressBar> bar;
  std::string watch;
  qbctl::EventFn on_event;
  std::function<void()> tick;
  if (show) {
    bar.emplace(inv.progress_job);
    watch = qbctl::events_target(inv.domain);
    on_event = [&](const qbctl::SseEvent& ev) { return bar->on_event(ev); };
    tick = [&] { bar->draw(); };
  }
  auto timeout = std::chrono::milliseconds(static_cast<long long>(g.timeout_s * 1000));
  auto result = qbctl::call(g.socket, qbctl::Request{inv.method, inv.target, inv.body}, timeout,
                            watch, on_event, tick);
  if (bar) bar->clear();
  if (auto* e = std::get_if<qbctl::TransportError>(&result)) return transport_failure(*e, g.json);
  return answer(g, inv, std::get<qbctl::Response>(result));
}

int help(const qbctl::Parsed& p) {
  if (p.help_topic.empty()) {
    std::cout << qbctl::usage();
    return 0;
  }
  auto text = qbctl::command_help(p.help_topic);
  if (!text) {
    std::cerr << "qbrokerctl: no command '" << p.help_topic.front() << "' (see --help)\n";
    return kUsage;
  }
  std::cout << *text;
  return 0;
}

// The domains `socket` has, for completion; none when it does not answer within a moment.
std::vector<std::string> domain_names(const std::string& socket) {
  auto result =
      qbctl::call(socket, qbctl::Request{"GET", "/v1/domains", {}}, std::chrono::seconds(2));
  auto* r = std::get_if<qbctl::Response>(&result);
  if (r == nullptr || r->status != 200) return {};
  std::error_code ec;
  json::value body = json::parse(r->body, ec);
  std::vector<std::string> names;
  const auto* list = ec || !body.is_object() ? nullptr : body.get_object().if_contains("domains");
  if (list == nullptr || !list->is_array()) return names;
  for (const auto& d : list->get_array()) {
    const auto* name = d.is_object() ? d.get_object().if_contains("name") : nullptr;
    if (name != nullptr && name->is_string()) names.emplace_back(name->get_string());
  }
  return names;
}

// Commands for the build and the shell, not for people: `__man SECTION` prints a section of
// qbrokerctl(1) in roff; `__complete WORDS...` prints "files" or "-" and then the candidates for
// the last word, one a line (ctl/qbrokerctl.bash).
int hidden(const std::vector<std::string>& args, const char* env) {
  if (args[0] == "__man") {
    auto section = qbctl::man_section(args.size() > 1 ? args[1] : "");
    if (!section) {
      std::cerr << "qbrokerctl: __man options|commands\n";
      return kUsage;
    }
    std::cout << *section;
    return 0;
  }
  auto words = std::span(args).subspan(1);
  auto c = qbctl::complete(words, env != nullptr ? env : "", domain_names);
  std::cout << (c.files ? "files" : "-") << "\n";
  for (const auto& w : c.words) std::cout << w << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  const char* env = std::getenv("QBROKER_SOCKET");
  if (!args.empty() && (args[0] == "__man" || args[0] == "__complete")) return hidden(args, env);
  auto parsed = qbctl::parse(args, env != nullptr ? env : "");
  if (auto* e = std::get_if<qbctl::CliError>(&parsed)) {
    std::cerr << "qbrokerctl: " << e->message << "\n";
    return kUsage;
  }
  auto& p = std::get<qbctl::Parsed>(parsed);
  if (p.global.version) {
    std::cout << "qbrokerctl 0.1.0\n";
    return 0;
  }
  if (p.global.help) return help(p);
  if (p.invocation->view == qbctl::View::events) return events(p.global, *p.invocation);
  if (p.invocation->view == qbctl::View::top) return qbctl::top(p.global, *p.invocation);
  return request(p.global, *p.invocation);
}
