// The benchmarks' floor for QMP: one blocking socket, commands as text, fds with SCM_RIGHTS,
// no parser beyond finding the reply line.
#pragma once

#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>

#include "fdpass/unique_fd.hpp"

namespace qbbench {

// The next line from `sock`, `buf` holding what was read past the last one.
inline std::string read_line(int sock, std::string& buf) {
  for (;;) {
    auto nl = buf.find('\n');
    if (nl != std::string::npos) {
      std::string l = buf.substr(0, nl);
      buf.erase(0, nl + 1);
      return l;
    }
    char b[4096];
    ssize_t n = ::read(sock, b, sizeof(b));
    if (n <= 0) throw std::runtime_error("raw QMP: connection lost");
    buf.append(b, static_cast<std::size_t>(n));
  }
}

// One line in one sendmsg, with `pass` (when not -1) as its SCM_RIGHTS fd.
inline void send_line(int sock, const std::string& line, int pass = -1) {
  msghdr msg{};
  iovec iov{const_cast<char*>(line.data()), line.size()};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
  if (pass >= 0) {
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(c), &pass, sizeof(int));
  }
  if (::sendmsg(sock, &msg, MSG_NOSIGNAL) != static_cast<ssize_t>(line.size())) {
    throw std::runtime_error("sendmsg");
  }
}

// The floor: one blocking QMP socket, commands as text, fds with SCM_RIGHTS.
class RawQmp {
 public:
  explicit RawQmp(fdpass::UniqueFd fd) : fd_(std::move(fd)) {}
  std::string cmd(const std::string& json, int pass = -1) {
    send_line(fd_.get(), json + "\n", pass);
    for (;;) {
      std::string l = line_();
      if (l.find("\"event\"") != std::string::npos) continue;
      if (l.find("\"error\"") != std::string::npos) {
        throw std::runtime_error("raw QMP: " + json + " -> " + l);
      }
      return l;
    }
  }

 private:
  std::string line_() { return read_line(fd_.get(), buf_); }
  fdpass::UniqueFd fd_;
  std::string buf_;
};

// Polls query-migrate every 2 ms until it reports completed.
inline void wait_migration(RawQmp& q) {
  for (;;) {
    std::string r = q.cmd(R"({"execute":"query-migrate"})");
    if (r.find("\"completed\"") != std::string::npos) return;
    if (r.find("\"failed\"") != std::string::npos) {
      throw std::runtime_error("raw migration failed: " + r);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
}

}  // namespace qbbench
