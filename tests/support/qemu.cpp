#include "support/qemu.hpp"

#include <poll.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <fcntl.h>
#include <unistd.h>

#include <cstdlib>
#include <stdexcept>
#include <thread>

#include "fdpass/devices.hpp"

namespace qbtest {

using Clock = std::chrono::steady_clock;

std::string guest_dir() {
  const char* env = std::getenv("QB_GUEST_DIR");
  return env != nullptr && *env != '\0' ? env : "/var/cache/qbroker/guest";
}
namespace {
std::string env_or_empty(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr ? v : "";
}
}  // namespace

std::string qemu_binary() {
  std::string prefix = env_or_empty("QB_QEMU_PREFIX");
  std::string path = !prefix.empty() ? prefix + "/usr/bin/qemu-system-x86_64"
                                     : env_or_empty("QB_QEMU");
  if (path.empty()) path = "/usr/bin/qemu-system-x86_64";
  if (::access(path.c_str(), X_OK) != 0) {
    throw std::runtime_error(path + " is missing: run scripts/setup.sh (and for $QB_QEMU_PREFIX "
                             "tests/guest/second-qemu.sh)");
  }
  return path;
}

std::vector<std::string> qemu_data_dirs() {
  std::string prefix = env_or_empty("QB_QEMU_PREFIX");
  if (prefix.empty()) return {};
  return {prefix + "/usr/share/qemu", prefix + "/usr/share/seabios", prefix + "/usr/lib/ipxe/qemu"};
}

bool is_anonymous_memory(const std::string& fd_link) {
  char target[512] = {};
  ssize_t n = ::readlink(fd_link.c_str(), target, sizeof(target) - 1);
  struct stat st {};
  if (n < 0 || ::stat(fd_link.c_str(), &st) != 0) return false;
  return S_ISREG(st.st_mode) && st.st_nlink == 0 && std::string_view(target).starts_with("/memfd:");
}

std::string guest_kernel() { return guest_dir() + "/vmlinuz"; }
std::string guest_initrd() { return guest_dir() + "/initramfs.cpio.gz"; }
std::string guest_boot_disk() { return guest_dir() + "/boot-disk.img"; }
std::string guest_boot_iso() { return guest_dir() + "/boot.iso"; }

fdpass::UniqueFd connect_retry(const std::string& path, std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  for (;;) {
    auto fd = fdpass::connect_unix(path);
    if (fd) return std::move(*fd);
    if (Clock::now() >= deadline) return {};
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

static bool wait_readable(int fd, Clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  if (left.count() < 0) return false;
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, static_cast<int>(left.count())) == 1;
}

std::optional<std::string> read_line(int fd, std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  std::string line;
  for (;;) {
    if (!wait_readable(fd, deadline)) return std::nullopt;
    char c;
    ssize_t n = ::read(fd, &c, 1);
    if (n <= 0) return std::nullopt;
    if (c == '\n') return line;
    line.push_back(c);
  }
}

bool write_all(int fd, std::string_view data) {
  while (!data.empty()) {
    ssize_t n = ::write(fd, data.data(), data.size());
    if (n <= 0) return false;
    data.remove_prefix(static_cast<std::size_t>(n));
  }
  return true;
}

bool qmp_handshake(int fd, std::chrono::milliseconds timeout) {
  auto greeting = read_line(fd, timeout);
  if (!greeting || greeting->find("\"QMP\"") == std::string::npos) return false;
  auto reply = qmp_command(fd, R"({"execute":"qmp_capabilities"})", timeout);
  return reply && reply->find("\"return\"") != std::string::npos;
}

std::optional<std::string> qmp_command(int fd, const std::string& json,
                                       std::chrono::milliseconds timeout) {
  if (!write_all(fd, json + "\n")) return std::nullopt;
  auto deadline = Clock::now() + timeout;
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    auto line = read_line(fd, left);
    if (!line) return std::nullopt;
    if (line->find("\"event\"") == std::string::npos) return line;
  }
}

pid_t spawn_with_listeners(const std::vector<std::string>& argv, int qmp, int console) {
  // Non-blocking, as the launcher hands them over (see open_endpoints in launcher.cpp).
  for (int fd : {qmp, console}) ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  const pid_t pid = ::fork();
  if (pid != 0) return pid;
  // Both lifted above 4 first, so that placing one never overwrites the other; dup2 onto 3 and
  // 4 clears close-on-exec there. Whatever else fd 4 was in this process (parallel_bench's
  // threads open and close fds all the time) QEMU must not take for its console.
  const int q = ::fcntl(qmp, F_DUPFD, 5);
  const int c = ::fcntl(console, F_DUPFD, 5);
  if (q < 0 || c < 0 || ::dup2(q, 3) != 3 || ::dup2(c, 4) != 4) ::_exit(126);
  ::close(q);
  ::close(c);
  const int null = ::open("/dev/null", O_RDWR);
  ::dup2(null, 1);
  ::dup2(null, 2);
  ::execv(args[0], args.data());
  ::_exit(127);
}

void become_subreaper() { ::prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); }

int reap_exited_children() {
  int n = 0;
  while (::waitpid(-1, nullptr, WNOHANG) > 0) ++n;
  return n;
}

bool GuestConsole::read_until(const std::string& marker, std::string& out,
                              std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  for (;;) {
    if (auto at = buffer_.find(marker); at != std::string::npos) {
      out = buffer_.substr(0, at + marker.size());
      buffer_.erase(0, at + marker.size());
      return true;
    }
    if (!wait_readable(fd_.get(), deadline)) return false;
    char buf[4096];
    ssize_t n = ::read(fd_.get(), buf, sizeof(buf));
    if (n <= 0) return false;
    buffer_.append(buf, static_cast<std::size_t>(n));
  }
}

bool GuestConsole::wait_ready(std::chrono::milliseconds timeout) {
  std::string out;
  if (!read_until("QBROKER-GUEST-READY", out, timeout)) return false;
  // Let the shell print its first prompt before commands go in.
  std::string prompt;
  read_until("# ", prompt, timeout);
  return true;
}

std::optional<GuestConsole::Output> GuestConsole::run(const std::string& command,
                                                      std::chrono::milliseconds timeout) {
  // The markers are split in the sent text so the shell's echo of the line never matches.
  std::string line = "echo \"@@B\"\"N@@\"; eval '" + command + "'; echo \"@@E\"\"N:$?@@\"\n";
  if (!write_all(fd_.get(), line)) return std::nullopt;
  std::string upto;
  if (!read_until("@@BN@@", upto, timeout)) return std::nullopt;
  std::string body;
  if (!read_until("@@EN:", body, timeout)) return std::nullopt;
  std::string rc;
  if (!read_until("@@", rc, timeout)) return std::nullopt;
  Output out;
  out.text = body.substr(0, body.size() - 5);
  // Trim the CRLF after the begin marker and before the end marker.
  while (!out.text.empty() && (out.text.front() == '\r' || out.text.front() == '\n')) out.text.erase(0, 1);
  while (!out.text.empty() && (out.text.back() == '\r' || out.text.back() == '\n')) out.text.pop_back();
  out.rc = std::atoi(rc.c_str());
  return out;
}

}  // namespace qbtest
