// dist/comm_tcp.cpp: the TCP backend of dist::Comm, for launchers that start processes without
// MPI (torchrun, srun without --mpi). A full mesh of TCP connections, one per pair of ranks.
//
// Rendezvous: rank 0 listens on MASTER_ADDR:MASTER_PORT (default 29500, as torchrun; under
// torchrun's agent store MASTER_PORT + 1, or AUTOMOE_MASTER_PORT). Every other
// rank opens a listening socket on an ephemeral port, connects to rank 0 (retried until the
// deadline) and registers (rank, world size, port); rank 0 checks that every rank agrees on the
// world size and sends back the table of (address as rank 0 saw it, port). Then rank j connects
// to every rank 0 < i < j and accepts the ranks above it. The connection to rank 0 stays as the
// (0, j) link.
//
// Wire: every message is a frame, a 16-byte header (tag = collective, communicator id, payload
// bytes) and the payload; the receiver checks the header, so ranks that call different
// collectives get an error naming both instead of garbage. A collective is one or two exchanges:
// all of its sends and receives progress together on nonblocking sockets under poll(), so two
// ranks sending each other megabytes never block each other.
//
// Determinism: a reduction is a reduce-scatter where the owner of each block sums the ranks'
// blocks in rank order, then an all-gather of the blocks: every rank gets the same bits.
// Failure: a peer whose connection closes (it died, or aborted) is an error at once, naming it;
// no data moving for AUTOMOE_DIST_TIMEOUT seconds is an error naming the peers waited on.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "core/check.h"
#include "dist/comm_backend.h"

namespace automoe::dist {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// ---- frames -----------------------------------------------------------------------------------

enum Tag : uint32_t {
  kHello = 0x4d4f0001,  // rendezvous: a rank introduces itself
  kTable,               // rendezvous: rank 0's answer
  kBarrier,
  kReduceBlocks,        // a reduction's blocks to their owners
  kGatherBlocks,        // the reduced blocks to everyone
  kBroadcast,
  kGather,
  kAllGather,
  kAllToAll,
  kAllToAllV,
};

const char* tag_name(uint32_t t) {
  switch (t) {
    case kHello: return "hello";
    case kTable: return "table";
    case kBarrier: return "barrier";
    case kReduceBlocks: return "reduction (blocks to owners)";
    case kGatherBlocks: return "reduction (blocks from owners)";
    case kBroadcast: return "broadcast";
    case kGather: return "gather";
    case kAllGather: return "all-gather";
    case kAllToAll: return "all-to-all";
    case kAllToAllV: return "all-to-all-v";
  }
  return "not an automoe frame";
}

struct Header {
  uint32_t tag = 0;
  uint32_t comm = 0;   // communicator id (the order of make_groups' groups, the same on all ranks)
  uint64_t bytes = 0;  // payload
};
static_assert(sizeof(Header) == 16);

// Rendezvous payloads.
struct Hello {
  int32_t rank = 0, world = 0, port = 0, pad = 0;
};
struct Entry {  // one rank in rank 0's table
  char addr[64] = {};  // as rank 0 saw its connection
  int32_t port = 0, pad = 0;
};

// ---- sockets ----------------------------------------------------------------------------------

std::string errno_text(int e) { return std::strerror(e); }

void set_nonblocking(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL, 0) | O_NONBLOCK); }

void set_nodelay(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

addrinfo* resolve(const std::string& host, int port, bool passive) {
  addrinfo hints{}, *res = nullptr;
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  if (passive) hints.ai_flags = AI_PASSIVE;
  const std::string p = std::to_string(port);
  const int rc = getaddrinfo(host.empty() ? nullptr : host.c_str(), p.c_str(), &hints, &res);
  AM_CHECK(rc == 0 && res, "cannot resolve host '{}' ({}); check MASTER_ADDR", host, gai_strerror(rc));
  return res;
}

// A nonblocking listening socket on `port` (0: ephemeral) of every address of `family`.
int listen_on(int family, int port, int* bound_port) {
  const int fd = socket(family, SOCK_STREAM, 0);
  AM_CHECK(fd >= 0, "socket() failed: {}", errno_text(errno));
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_storage ss{};
  socklen_t len;
  if (family == AF_INET6) {
    auto* a = reinterpret_cast<sockaddr_in6*>(&ss);
    a->sin6_family = AF_INET6;
    a->sin6_addr = in6addr_any;
    a->sin6_port = htons(uint16_t(port));
    len = sizeof(sockaddr_in6);
  } else {
    auto* a = reinterpret_cast<sockaddr_in*>(&ss);
    a->sin_family = AF_INET;
    a->sin_addr.s_addr = htonl(INADDR_ANY);
    a->sin_port = htons(uint16_t(port));
    len = sizeof(sockaddr_in);
  }
  if (bind(fd, reinterpret_cast<sockaddr*>(&ss), len) != 0 || listen(fd, SOMAXCONN) != 0) {
    const int e = errno;
    close(fd);
    AM_FAIL("cannot listen on TCP port {} ({}); {}", port, errno_text(e),
            port ? "pick a free MASTER_PORT, or set AUTOMOE_MASTER_PORT (under torchrun automoe "
                   "takes MASTER_PORT + 1: torchrun's own store holds MASTER_PORT)"
                 : "no ephemeral port is free");
  }
  socklen_t l = sizeof ss;
  getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &l);
  *bound_port = ntohs(ss.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port
                                               : reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
  set_nonblocking(fd);
  return fd;
}

// Milliseconds left before `deadline` (at least 0).
int ms_left(Clock::time_point deadline) {
  const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return int(std::clamp<int64_t>(ms, 0, 1000));
}

// Connects to host:port, retrying refused connections (the peer is not listening yet) until the
// deadline. Returns a nonblocking socket.
int connect_retry(const std::string& host, int port, Clock::time_point deadline, const std::string& who) {
  addrinfo* res = resolve(host, port, false);
  std::string last = "no attempt";
  while (true) {
    const int fd = socket(res->ai_family, SOCK_STREAM, 0);
    AM_CHECK(fd >= 0, "socket() failed: {}", errno_text(errno));
    set_nonblocking(fd);
    int rc = connect(fd, res->ai_addr, res->ai_addrlen), err = rc == 0 ? 0 : errno;
    if (err == EINPROGRESS) {
      pollfd p{fd, POLLOUT, 0};
      while ((rc = poll(&p, 1, ms_left(deadline))) == 0 && Clock::now() < deadline) {
      }
      socklen_t l = sizeof err;
      if (rc > 0) getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &l);
      else err = rc == 0 ? ETIMEDOUT : errno;
    }
    if (err == 0) {
      freeaddrinfo(res);
      set_nodelay(fd);
      return fd;
    }
    close(fd);
    last = errno_text(err);
    if (Clock::now() >= deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  freeaddrinfo(res);
  AM_FAIL("could not connect to {} at {}:{} within {} s ({}); check that every rank started and "
          "MASTER_ADDR/MASTER_PORT name rank 0's host and a free port; raise AUTOMOE_DIST_TIMEOUT "
          "(seconds) if ranks start far apart",
          who, host, port, dist_timeout_s(), last);
}

// Accepts one connection on the nonblocking listener before the deadline.
int accept_one(int lfd, Clock::time_point deadline, std::string* peer_addr, const std::string& waiting_for) {
  while (true) {
    sockaddr_storage ss{};
    socklen_t l = sizeof ss;
    const int fd = accept(lfd, reinterpret_cast<sockaddr*>(&ss), &l);
    if (fd >= 0) {
      set_nonblocking(fd);
      set_nodelay(fd);
      char buf[INET6_ADDRSTRLEN] = {};
      if (ss.ss_family == AF_INET6)
        inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6*>(&ss)->sin6_addr, buf, sizeof buf);
      else
        inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(&ss)->sin_addr, buf, sizeof buf);
      *peer_addr = buf;
      return fd;
    }
    AM_CHECK(errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR || errno == ECONNABORTED,
             "accept() failed: {}", errno_text(errno));
    AM_CHECK(Clock::now() < deadline,
             "rendezvous: waited {} s for {} to connect; did every rank start (and with the same "
             "MASTER_ADDR/MASTER_PORT)? Raise AUTOMOE_DIST_TIMEOUT (seconds) if ranks start far apart",
             dist_timeout_s(), waiting_for);
    pollfd p{lfd, POLLIN, 0};
    poll(&p, 1, ms_left(deadline));
  }
}

// ---- the mesh and its one primitive: an exchange of frames ------------------------------------

struct Mesh {
  int rank = 0, size = 1;
  std::vector<int> fd;  // fd[r]: the connection to world rank r; -1 for this rank
  double timeout = 600;

  ~Mesh() { close_all(); }
  void close_all() {
    for (int& f : fd)
      if (f >= 0) {
        close(f);
        f = -1;
      }
  }
};

// One frame of an exchange, to or from one peer (a world rank).
struct Xfer {
  int peer = 0;
  char* data = nullptr;  // payload (send: read from, recv: written to)
  int64_t bytes = 0;     // payload bytes (recv: expected)
  Header head{};         // send: filled in; recv: as it arrives
  int64_t done = 0;      // header + payload bytes moved
  int64_t total() const { return int64_t(sizeof(Header)) + bytes; }
};

[[noreturn]] void peer_gone(int peer, const std::string& what, const std::string& how) {
  AM_FAIL("rank {} closed its connection during {} ({}): it died or stopped on an error (see its "
          "own message); this rank stops too",
          peer, what, how);
}

// Moves what it can of `x` without blocking; true when bytes moved.
bool progress_send(const Mesh& m, Xfer& x, const std::string& what) {
  bool moved = false;
  while (x.done < x.total()) {
    iovec iov[2];
    int n = 0;
    if (x.done < int64_t(sizeof(Header))) {
      iov[n++] = {reinterpret_cast<char*>(&x.head) + x.done, sizeof(Header) - size_t(x.done)};
      if (x.bytes) iov[n++] = {x.data, size_t(x.bytes)};
    } else {
      iov[n++] = {x.data + (x.done - int64_t(sizeof(Header))), size_t(x.total() - x.done)};
    }
    msghdr mh{};
    mh.msg_iov = iov;
    mh.msg_iovlen = size_t(n);
    const ssize_t k = sendmsg(m.fd[size_t(x.peer)], &mh, MSG_NOSIGNAL);
    if (k > 0) {
      x.done += k;
      moved = true;
      continue;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) break;
    if (errno == EPIPE || errno == ECONNRESET) peer_gone(x.peer, what, errno_text(errno));
    AM_FAIL("{}: sending to rank {} failed: {}", what, x.peer, errno_text(errno));
  }
  return moved;
}

bool progress_recv(const Mesh& m, Xfer& x, uint32_t tag, uint32_t comm, const std::string& what) {
  bool moved = false;
  while (x.done < x.total()) {
    char* dst;
    size_t want;
    if (x.done < int64_t(sizeof(Header))) {
      dst = reinterpret_cast<char*>(&x.head) + x.done;
      want = sizeof(Header) - size_t(x.done);
    } else {
      dst = x.data + (x.done - int64_t(sizeof(Header)));
      want = size_t(x.total() - x.done);
    }
    const ssize_t k = recv(m.fd[size_t(x.peer)], dst, want, 0);
    if (k == 0) peer_gone(x.peer, what, "end of stream");
    if (k < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) break;
      if (errno == ECONNRESET) peer_gone(x.peer, what, errno_text(errno));
      AM_FAIL("{}: receiving from rank {} failed: {}", what, x.peer, errno_text(errno));
    }
    const bool header_was_open = x.done < int64_t(sizeof(Header));
    x.done += k;
    moved = true;
    if (header_was_open && x.done >= int64_t(sizeof(Header))) {
      const Header& h = x.head;
      AM_CHECK(h.tag == tag && h.comm == comm && h.bytes == uint64_t(x.bytes),
               "{}: rank {} sent a {} of {} bytes on communicator {} where this rank expected a {} "
               "of {} bytes on communicator {}: the ranks called different collectives (a bug; "
               "please report it)",
               what, x.peer, tag_name(h.tag), h.bytes, h.comm, tag_name(tag), x.bytes, comm);
    }
  }
  return moved;
}

// Runs every send and receive to completion together. Throws when a peer closes its connection,
// or when nothing moves for the timeout.
void exchange(const Mesh& m, uint32_t tag, uint32_t comm, const std::string& what,
              std::vector<Xfer>& sends, std::vector<Xfer>& recvs) {
  for (Xfer& x : sends) x.head = Header{tag, comm, uint64_t(x.bytes)};
  auto last_progress = Clock::now();
  std::vector<pollfd> pfd;
  std::vector<short> events(m.fd.size());
  while (true) {
    bool moved = false, pending = false;
    for (Xfer& x : sends)
      if (x.done < x.total()) {
        moved |= progress_send(m, x, what);
        pending |= x.done < x.total();
      }
    for (Xfer& x : recvs)
      if (x.done < x.total()) {
        moved |= progress_recv(m, x, tag, comm, what);
        pending |= x.done < x.total();
      }
    if (!pending) return;
    if (moved) {
      last_progress = Clock::now();
      continue;
    }
    std::fill(events.begin(), events.end(), short(0));
    for (const Xfer& x : sends)
      if (x.done < x.total()) events[size_t(x.peer)] |= POLLOUT;
    for (const Xfer& x : recvs)
      if (x.done < x.total()) events[size_t(x.peer)] |= POLLIN;
    pfd.clear();
    for (size_t r = 0; r < events.size(); ++r)
      if (events[r]) pfd.push_back({m.fd[r], events[r], 0});
    const double waited = seconds_since(last_progress);
    if (waited >= m.timeout) {
      std::string peers;
      for (const pollfd& p : pfd) {
        const size_t r = size_t(std::find(m.fd.begin(), m.fd.end(), p.fd) - m.fd.begin());
        peers += (peers.empty() ? "" : ", ") + std::to_string(r);
      }
      AM_FAIL("{} waited {:.0f} s with no data moving, for rank(s) {}: a rank stalled, hangs, or is "
              "far behind (it did not reach the same collective); raise AUTOMOE_DIST_TIMEOUT "
              "(seconds) if a rank legitimately needs longer",
              what, waited, peers);
    }
    const int ms = int(std::clamp((m.timeout - waited) * 1000.0, 1.0, 1000.0));
    if (poll(pfd.data(), nfds_t(pfd.size()), ms) < 0 && errno != EINTR)
      AM_FAIL("{}: poll() failed: {}", what, errno_text(errno));
  }
}

// ---- a communicator: a subset of the mesh ------------------------------------------------------

template <class T>
void combine(T* acc, const T* x, int64_t n, Reduce op) {
  if (op == Reduce::kSum)
    for (int64_t i = 0; i < n; ++i) acc[i] += x[i];
  else
    for (int64_t i = 0; i < n; ++i) acc[i] = std::max(acc[i], x[i]);
}

// out[n] <- blocks[0] (op) blocks[1] (op) ... in rank order (`stride` elements apart).
void reduce_in_rank_order(void* out, const char* blocks, int64_t stride, int ranks, int64_t n, Elem e, Reduce op) {
  const int64_t es = elem_bytes(e);
  if (n == 0) return;
  std::memcpy(out, blocks, size_t(n * es));
  for (int r = 1; r < ranks; ++r) {
    const char* b = blocks + r * stride * es;
    switch (e) {
      case Elem::kF32: combine(static_cast<float*>(out), reinterpret_cast<const float*>(b), n, op); break;
      case Elem::kF64: combine(static_cast<double*>(out), reinterpret_cast<const double*>(b), n, op); break;
      case Elem::kI64: combine(static_cast<int64_t*>(out), reinterpret_cast<const int64_t*>(b), n, op); break;
    }
  }
}

struct TcpComm final : Comm::Impl {
  std::shared_ptr<Mesh> mesh;
  std::vector<int> members;  // members[r]: the world rank of this communicator's rank r
  uint32_t id = 0;
  std::vector<char> scratch;  // the blocks a reduction's owner receives

  std::string what(const char* op) const {
    return fmt::format("TCP {} on rank {} of a group of {} (world rank {})", op, rank, size, mesh->rank);
  }

  Xfer xfer(int r, const void* data, int64_t bytes) const {
    Xfer x;
    x.peer = members[size_t(r)];
    x.data = static_cast<char*>(const_cast<void*>(data));
    x.bytes = bytes;
    return x;
  }

  void run(uint32_t tag, const char* op, std::vector<Xfer>& sends, std::vector<Xfer>& recvs) {
    exchange(*mesh, tag, id, what(op), sends, recvs);
  }

  void barrier() override {
    std::vector<Xfer> sends, recvs;
    for (int r = 0; r < size; ++r)
      if (r != rank) {
        sends.push_back(xfer(r, nullptr, 0));
        recvs.push_back(xfer(r, nullptr, 0));
      }
    run(kBarrier, "barrier", sends, recvs);
  }

  // out[counts[rank]] <- the reduction of block `rank` over ranks: rank r's block d is
  // send + offsets[d] elements, counts[d] long. The owner sums in rank order.
  void reduce_to_owners(void* out, const void* send, const std::vector<int64_t>& offsets,
                        const std::vector<int64_t>& counts, Elem e, Reduce op, const char* name) {
    const int64_t es = elem_bytes(e), mine = counts[size_t(rank)];
    scratch.resize(size_t(size * mine * es));
    const char* src = static_cast<const char*>(send);
    std::vector<Xfer> sends, recvs;
    for (int r = 0; r < size; ++r) {
      if (r == rank) continue;
      sends.push_back(xfer(r, src + offsets[size_t(r)] * es, counts[size_t(r)] * es));
      recvs.push_back(xfer(r, scratch.data() + r * mine * es, mine * es));
    }
    if (mine) std::memcpy(scratch.data() + rank * mine * es, src + offsets[size_t(rank)] * es, size_t(mine * es));
    run(kReduceBlocks, name, sends, recvs);
    reduce_in_rank_order(out, scratch.data(), mine, size, mine, e, op);
  }

  void allreduce(void* x, int64_t n, Elem e, Reduce op) override {
    const char* name = op == Reduce::kSum ? "all-reduce (sum)" : "all-reduce (max)";
    std::vector<int64_t> off(static_cast<size_t>(size) + 1), cnt(static_cast<size_t>(size));
    for (int r = 0; r <= size; ++r) off[size_t(r)] = n * r / size;
    for (int r = 0; r < size; ++r) cnt[size_t(r)] = off[size_t(r) + 1] - off[size_t(r)];
    const int64_t es = elem_bytes(e);
    char* p = static_cast<char*>(x);
    reduce_to_owners(p + off[size_t(rank)] * es, p, off, cnt, e, op, name);
    std::vector<Xfer> sends, recvs;
    for (int r = 0; r < size; ++r) {
      if (r == rank) continue;
      sends.push_back(xfer(r, p + off[size_t(rank)] * es, cnt[size_t(rank)] * es));
      recvs.push_back(xfer(r, p + off[size_t(r)] * es, cnt[size_t(r)] * es));
    }
    run(kGatherBlocks, name, sends, recvs);
  }

  void reduce_scatter_sum(float* recv, const float* send, int64_t n) override {
    std::vector<int64_t> off(static_cast<size_t>(size)), cnt(static_cast<size_t>(size), n);
    for (int r = 0; r < size; ++r) off[size_t(r)] = n * r;
    reduce_to_owners(recv, send, off, cnt, Elem::kF32, Reduce::kSum, "reduce-scatter");
  }

  void broadcast(void* data, int64_t bytes, int root) override {
    std::vector<Xfer> sends, recvs;
    if (rank == root) {
      for (int r = 0; r < size; ++r)
        if (r != root) sends.push_back(xfer(r, data, bytes));
    } else {
      recvs.push_back(xfer(root, data, bytes));
    }
    run(kBroadcast, "broadcast", sends, recvs);
  }

  void gather(void* recv, const void* send, int64_t bytes, int root) override {
    std::vector<Xfer> sends, recvs;
    if (rank == root) {
      char* out = static_cast<char*>(recv);
      for (int r = 0; r < size; ++r)
        if (r != root) recvs.push_back(xfer(r, out + r * bytes, bytes));
      if (bytes) std::memcpy(out + rank * bytes, send, size_t(bytes));
    } else {
      sends.push_back(xfer(root, send, bytes));
    }
    run(kGather, "gather", sends, recvs);
  }

  void allgather(void* recv, const void* send, int64_t bytes) override {
    char* out = static_cast<char*>(recv);
    std::vector<Xfer> sends, recvs;
    for (int r = 0; r < size; ++r) {
      if (r == rank) continue;
      sends.push_back(xfer(r, send, bytes));
      recvs.push_back(xfer(r, out + r * bytes, bytes));
    }
    if (bytes) std::memcpy(out + rank * bytes, send, size_t(bytes));
    run(kAllGather, "all-gather", sends, recvs);
  }

  void alltoall(int64_t* recv, const int64_t* send) override {
    std::vector<Xfer> sends, recvs;
    for (int r = 0; r < size; ++r) {
      if (r == rank) continue;
      sends.push_back(xfer(r, send + r, sizeof(int64_t)));
      recvs.push_back(xfer(r, recv + r, sizeof(int64_t)));
    }
    recv[rank] = send[rank];
    run(kAllToAll, "all-to-all", sends, recvs);
  }

  void alltoallv(void* recv, const int64_t* recv_counts, const void* send,
                 const int64_t* send_counts, int64_t row_bytes) override {
    const char* src = static_cast<const char*>(send);
    char* dst = static_cast<char*>(recv);
    std::vector<Xfer> sends, recvs;
    int64_t so = 0, ro = 0;
    for (int r = 0; r < size; ++r) {
      const int64_t sb = send_counts[r] * row_bytes, rb = recv_counts[r] * row_bytes;
      if (r == rank) {
        AM_CHECK(sb == rb, "all-to-all-v: rank {} sends itself {} rows but expects {}", rank,
                 send_counts[r], recv_counts[r]);
        if (sb) std::memcpy(dst + ro, src + so, size_t(sb));
      } else {
        sends.push_back(xfer(r, src + so, sb));
        recvs.push_back(xfer(r, dst + ro, rb));
      }
      so += sb;
      ro += rb;
    }
    run(kAllToAllV, "all-to-all-v", sends, recvs);
  }
};

// ---- the world ----------------------------------------------------------------------------------

struct TcpBackend final : Backend {
  std::shared_ptr<Mesh> mesh = std::make_shared<Mesh>();
  uint32_t next_id = 1;  // communicator ids, in the order every rank creates them

  const char* name() const override { return "tcp"; }
  int rank() const override { return mesh->rank; }
  int size() const override { return mesh->size; }

  std::shared_ptr<Comm::Impl> group(const std::vector<int>& members) override {
    auto c = std::make_shared<TcpComm>();
    c->mesh = mesh;
    c->members = members;
    c->id = next_id++;
    c->size = int(members.size());
    c->rank = int(std::find(members.begin(), members.end(), mesh->rank) - members.begin());
    return c;
  }

  void abort() override {
    mesh->close_all();  // every peer's next (or current) exchange with this rank fails at once
    std::_Exit(1);
  }

  void finalize() override { mesh->close_all(); }
};

// One rendezvous frame to or from the connection `fd` (its rank is not known yet, or not in the
// mesh), within `timeout` s. best_effort: errors are ignored (a farewell to a failing job).
void frame_on(int fd, bool sending, uint32_t tag, void* p, int64_t n, double timeout, const std::string& what,
              bool best_effort) {
  Mesh one;
  one.fd = {fd};
  one.timeout = timeout;
  std::vector<Xfer> x(1), none;
  x[0].data = static_cast<char*>(p);
  x[0].bytes = n;
  try {
    if (sending) exchange(one, tag, 0, what, x, none);
    else exchange(one, tag, 0, what, none, x);
  } catch (const std::exception&) {
    one.fd = {-1};  // the caller owns fd
    if (!best_effort) throw;
  }
  one.fd = {-1};
}
void send_on(int fd, uint32_t tag, const void* p, int64_t n, double timeout, const std::string& what,
             bool best_effort = false) {
  frame_on(fd, true, tag, const_cast<void*>(p), n, timeout, what, best_effort);
}
void recv_on(int fd, uint32_t tag, void* p, int64_t n, double timeout, const std::string& what) {
  frame_on(fd, false, tag, p, n, timeout, what, false);
}

}  // namespace

std::unique_ptr<Backend> start_tcp(const LaunchInfo& li) {
  const char* addr_env = std::getenv("MASTER_ADDR");
  AM_CHECK(addr_env && *addr_env,
           "{} started this process as rank {} of {} without MPI, and automoe's TCP rendezvous "
           "needs MASTER_ADDR (rank 0's host name or address) and MASTER_PORT (default 29500); "
           "under Slurm: export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | "
           "head -n1) before srun (docs/DISTRIBUTED.md)",
           li.launcher, li.rank, li.world_size);
  const std::string master = addr_env;
  // torchrun's agent on node 0 serves its own TCPStore on MASTER_PORT (it says so with
  // TORCHELASTIC_USE_AGENT_STORE=True): the rendezvous takes the next port then.
  // AUTOMOE_MASTER_PORT names the port outright.
  const char* own_env = std::getenv("AUTOMOE_MASTER_PORT");
  const char* port_env = own_env && *own_env ? own_env : std::getenv("MASTER_PORT");
  const char* agent = std::getenv("TORCHELASTIC_USE_AGENT_STORE");
  const bool next = !(own_env && *own_env) && agent && std::string(agent) == "True";
  const int port = (port_env && *port_env ? std::atoi(port_env) : 29500) + (next ? 1 : 0);
  AM_CHECK(port > 0 && port < 65536, "{}={} is not a TCP port", own_env && *own_env ? "AUTOMOE_MASTER_PORT" : "MASTER_PORT",
           port_env ? port_env : "");

  auto b = std::make_unique<TcpBackend>();
  Mesh& m = *b->mesh;
  m.rank = li.rank;
  m.size = li.world_size;
  m.timeout = dist_timeout_s();
  m.fd.assign(size_t(m.size), -1);
  const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                           std::chrono::duration<double>(m.timeout));
  const std::string who = fmt::format("rendezvous of rank {} of {}", m.rank, m.size);

  std::vector<Entry> table(size_t(m.size));
  if (m.rank == 0) {
    addrinfo* res = resolve(master, port, true);
    const int family = res->ai_family;
    freeaddrinfo(res);
    int bound = 0;
    const int lfd = listen_on(family, port, &bound);
    std::string error;
    int rejected = -1;  // the connection of a rank that does not fit
    try {
      for (int got = 0; got < m.size - 1 && error.empty();) {
        std::string missing, peer_addr;
        for (int r = 1; r < m.size; ++r)
          if (m.fd[size_t(r)] < 0) missing += (missing.empty() ? "rank " : ", ") + std::to_string(r);
        const int fd = accept_one(lfd, deadline, &peer_addr, missing);
        Hello h;
        recv_on(fd, kHello, &h, sizeof h, m.timeout, who);
        if (h.world != m.size)
          error = fmt::format("rank {} was started as one of {} processes, but rank 0 as one of {}: "
                              "every rank must see the same world size (WORLD_SIZE, or srun's task count)",
                              h.rank, h.world, m.size);
        else if (h.rank <= 0 || h.rank >= m.size || m.fd[size_t(h.rank)] >= 0)
          error = fmt::format("two processes registered as rank {} of {}: check RANK / SLURM_PROCID", h.rank, m.size);
        if (!error.empty()) {
          rejected = fd;
          break;
        }
        m.fd[size_t(h.rank)] = fd;
        std::snprintf(table[size_t(h.rank)].addr, sizeof table[0].addr, "%s", peer_addr.c_str());
        table[size_t(h.rank)].port = h.port;
        ++got;
      }
    } catch (...) {
      close(lfd);
      throw;
    }
    close(lfd);
    // the answer: rank 0's world size (-1: refused, its message says why), then the table
    Hello reply;
    reply.world = error.empty() ? m.size : -1;
    if (!error.empty()) {  // every rank that registered, and the misfit, stops with a message
      for (int fd : m.fd)
        if (fd >= 0) send_on(fd, kHello, &reply, sizeof reply, 1.0, who, /*best_effort=*/true);
      reply.world = m.size;
      send_on(rejected, kHello, &reply, sizeof reply, 1.0, who, /*best_effort=*/true);
      close(rejected);
      AM_FAIL("{}", error);
    }
    for (int r = 1; r < m.size; ++r) {
      send_on(m.fd[size_t(r)], kHello, &reply, sizeof reply, m.timeout, who);
      send_on(m.fd[size_t(r)], kTable, table.data(), int64_t(sizeof(Entry)) * m.size, m.timeout, who);
    }
  } else {
    const int fd0 = connect_retry(master, port, deadline, "rank 0 (MASTER_ADDR:MASTER_PORT)");
    sockaddr_storage ss{};
    socklen_t l = sizeof ss;
    getsockname(fd0, reinterpret_cast<sockaddr*>(&ss), &l);
    int my_port = 0;
    const int lfd = listen_on(ss.ss_family, 0, &my_port);
    m.fd[0] = fd0;
    Hello h;
    h.rank = m.rank;
    h.world = m.size;
    h.port = my_port;
    try {
      send_on(fd0, kHello, &h, sizeof h, m.timeout, who);
      Hello reply;
      recv_on(fd0, kHello, &reply, sizeof reply, m.timeout, who);
      AM_CHECK(reply.world != -1, "rank 0 refused the rendezvous (its message says why)");
      AM_CHECK(reply.world == m.size,
               "this rank was started as one of {} processes, but rank 0 as one of {}: every rank "
               "must see the same world size (WORLD_SIZE, or srun's task count)",
               m.size, reply.world);
      recv_on(fd0, kTable, table.data(), int64_t(sizeof(Entry)) * m.size, m.timeout, who);
      // the ranks below this one (not 0) listen already: connect to them, then accept the rest
      for (int r = 1; r < m.rank; ++r) {
        m.fd[size_t(r)] = connect_retry(table[size_t(r)].addr, table[size_t(r)].port, deadline,
                                        fmt::format("rank {}", r));
        send_on(m.fd[size_t(r)], kHello, &h, sizeof h, m.timeout, who);
      }
      for (int got = 0; got < m.size - 1 - m.rank; ++got) {
        std::string missing, peer_addr;
        for (int r = m.rank + 1; r < m.size; ++r)
          if (m.fd[size_t(r)] < 0) missing += (missing.empty() ? "rank " : ", ") + std::to_string(r);
        const int fd = accept_one(lfd, deadline, &peer_addr, missing);
        Hello in;
        recv_on(fd, kHello, &in, sizeof in, m.timeout, who);
        AM_CHECK(in.rank > m.rank && in.rank < m.size && m.fd[size_t(in.rank)] < 0,
                 "rendezvous: rank {} got a connection from rank {}, which it did not expect",
                 m.rank, in.rank);
        m.fd[size_t(in.rank)] = fd;
      }
    } catch (...) {
      close(lfd);
      throw;
    }
    close(lfd);
  }
  return b;
}

}  // namespace automoe::dist
